"""The `minilm-sentences` dataset: token ids in, the float MiniLM's embeddings as targets.

Test split: the 160 sentences of `EVALUATION_PAIRS` (80 paraphrase pairs, pair partners
adjacent) and 40 `DISTRACTORS` (same topic as a pair, different meaning).
Training/calibration split: `TRAINING_SENTENCES` plus sentences cut from Python standard-library
docstrings (the `stdlib-text` corpus), shuffled with a fixed seed; every split
is built offline and deterministically.

`x_*` are (N, L) int32 token ids padded with [PAD]=0 (L: the longest sentence of the split); `y_*`
are (N, 384) float32 unit-norm embeddings of the pretrained float model, so the model metric
"cosine" is the mean cosine similarity between a (compressed) model's embeddings and the float
model's. Computing the targets runs the encoder over ~710 sentences, so the arrays are cached in
`cache_dir()/data/`, keyed by the weights package version and the Python version (whose
docstrings make up the corpus).
"""

from __future__ import annotations

import functools
import io
import pathlib
import re
import sys
from collections.abc import Callable, Sequence

import numpy as np

from jaxshrink.data.cache import atomic_write_bytes, cache_dir
from jaxshrink.data.dataset import EMBEDDING, Dataset, freeze_arrays
from jaxshrink.data.sentence_pairs import DISTRACTORS, EVALUATION_PAIRS, TRAINING_SENTENCES
from jaxshrink.errors import JaxshrinkError

SENTENCES_VERSION = "v3"  # v3: from the clean-interpreter stdlib-text (v2)
SENTENCES_SEED = 0
TRAIN_SENTENCES = 512
# Docstring sentences kept in the corpus: 5 to 60 words, prose-like.
CORPUS_MIN_WORDS, CORPUS_MAX_WORDS = 5, 60
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_MARKS = ("::", "--", "==", "->", "()", ">>>")


def evaluation_sentences() -> list[str]:
  """The 200 test sentences: 80 paraphrase pairs, then 40 same-topic distractors.

  Sentences `2k` and `2k + 1` (k < 80) are paraphrases of each other; the last 40 each share a
  topic with one pair but not its meaning.
  """
  return [sentence for pair in EVALUATION_PAIRS for sentence in pair] + list(DISTRACTORS)


def split_sentences(text: str) -> list[str]:
  """Prose sentences of a docstring corpus, in order, deduplicated.

  Paragraphs holding doctests are skipped; a sentence is kept when it has 5 to 60 words, starts
  upper-case, ends with `.`, `!` or `?`, is at least 90% letters and spaces and has no code
  marks (`::`, `->`, `()`, ...).

  >>> split_sentences("Return the sum of two numbers. See also x().\\n\\nOk.")
  ['Return the sum of two numbers.']
  """
  kept: dict[str, None] = {}
  for paragraph in re.split(r"\n\s*\n", text):
    if ">>>" in paragraph:
      continue
    for sentence in _SENTENCE_BREAK.split(" ".join(paragraph.split())):
      words = len(sentence.split())
      if not CORPUS_MIN_WORDS <= words <= CORPUS_MAX_WORDS:
        continue
      if not (sentence[0].isupper() and sentence[-1] in ".!?"):
        continue
      letters = sum(c.isalpha() or c == " " for c in sentence)
      if letters < 0.9 * len(sentence) or any(mark in sentence for mark in _CODE_MARKS):
        continue
      kept.setdefault(sentence)
  return list(kept)


def corpus_sentences() -> list[str]:
  """The offline sentence corpus (~5,700 docstring sentences for CPython 3.11), cached as text.

  Built from the `stdlib-text` docstrings with `split_sentences`; the order is the corpus order.
  """
  from jaxshrink.data.text import stdlib_text

  version = f"{sys.version_info.major}.{sys.version_info.minor}"
  path = cache_dir() / "data" / f"minilm-corpus-{version}-{SENTENCES_VERSION}.txt"
  if path.exists():
    try:
      return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
      path.unlink(missing_ok=True)  # outside damage; cheap to rebuild
  sentences = split_sentences(stdlib_text())
  atomic_write_bytes(path, ("\n".join(sentences) + "\n").encode("utf-8"))
  return sentences


def training_sentences() -> list[str]:
  """The training/calibration sentences: own sentences first, then shuffled docstring ones.

  Sentences longer than the model's `TRAIN_TOKENS` are skipped; `TRAIN_SENTENCES` are kept.
  """
  from jaxshrink.models.minilm import TRAIN_TOKENS, tokenizer

  evaluation = set(evaluation_sentences())
  corpus = [s for s in corpus_sentences() if s not in evaluation]
  order = np.random.default_rng(SENTENCES_SEED).permutation(len(corpus))
  candidates = list(TRAINING_SENTENCES) + [corpus[i] for i in order]
  lengths = [len(ids) for ids in tokenizer().token_lists(candidates)]
  short = [s for s, n in zip(candidates, lengths, strict=True) if n <= TRAIN_TOKENS]
  return short[:TRAIN_SENTENCES]


def read_sentences(path: str | pathlib.Path) -> list[str]:
  """One sentence per line of a UTF-8 text file; blank lines are skipped.

  Raises:
    JaxshrinkError: the file is missing, not UTF-8, or holds no sentence.
  """
  path = pathlib.Path(path)
  try:
    text = path.read_text(encoding="utf-8")
  except FileNotFoundError:
    raise JaxshrinkError(f"sentence file `{path}` does not exist.") from None
  except UnicodeDecodeError as exc:
    raise JaxshrinkError(f"sentence file `{path}` is not UTF-8 text: {exc}.") from None
  sentences = [line.strip() for line in text.splitlines() if line.strip()]
  if not sentences:
    raise JaxshrinkError(f"sentence file `{path}` holds no sentences; write one sentence per line.")
  return sentences


def _float_model() -> tuple[Callable, dict]:
  from jaxshrink.models import get_model
  from jaxshrink.models.minilm import minilm_params

  return get_model("minilm-l6").apply, minilm_params()


def sentence_dataset(
  sentences: Sequence[str],
  name: str,
  *,
  apply: Callable | None = None,
  params: dict | None = None,
) -> Dataset:
  """A test-only embedding dataset: ids of `sentences`, targets from a float model.

  Args:
    sentences: the test sentences.
    name: the dataset's name (e.g. the file it came from).
    apply: the float model's `(params, ids) -> embeddings`; default: the pretrained MiniLM.
    params: its float params; default: the pretrained weights.

  Raises:
    JaxshrinkError: no sentences.
  """
  from jaxshrink.models.minilm import embed_ids, encode

  if apply is None or params is None:
    apply, params = _float_model()
  x_test = encode(sentences)
  y_test = embed_ids(apply, params, x_test).astype(np.float32)
  x_train = np.zeros((0, x_test.shape[1]), np.int32)
  y_train = np.zeros((0, y_test.shape[1]), np.float32)
  arrays = [x_train, y_train, x_test, y_test]
  freeze_arrays(*arrays)
  return Dataset(name, EMBEDDING, *arrays, num_classes=int(y_test.shape[1]))


def dataset_key() -> str:
  """What determines `minilm-sentences`: the weights release (its targets), Python (the
  docstring sentences) and the version of this dataset."""
  from jaxshrink.models.minilm import weights_version

  weights = weights_version()
  return f"{weights}-py{sys.version_info.major}.{sys.version_info.minor}-{SENTENCES_VERSION}"


def _cache_path() -> pathlib.Path:
  from jaxshrink.models.minilm import minilm_files

  minilm_files()  # the missing-package error, with its pip command
  return cache_dir() / "data" / f"minilm-sentences-{dataset_key()}.npz"


_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _build_arrays() -> dict[str, np.ndarray]:
  from jaxshrink.models.minilm import embed_ids, encode

  apply, params = _float_model()
  arrays = {}
  for split, sentences in (("train", training_sentences()), ("test", evaluation_sentences())):
    ids = encode(sentences)
    arrays[f"x_{split}"] = ids
    arrays[f"y_{split}"] = embed_ids(apply, params, ids).astype(np.float32)
  return arrays


@functools.cache
def _cached_arrays() -> tuple[np.ndarray, ...]:
  path = _cache_path()
  arrays = None
  if path.exists():
    try:
      with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in _KEYS}
    except (OSError, ValueError, KeyError):
      path.unlink(missing_ok=True)  # damaged outside our atomic writes: rebuild
  if arrays is None:
    arrays = _build_arrays()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
  out = tuple(np.ascontiguousarray(arrays[key]) for key in _KEYS)
  freeze_arrays(*out)
  return out


def load_minilm_sentences_dataset() -> Dataset:
  """Loads `minilm-sentences`: 512 training and 200 test sentences with float targets.

  >>> ds = load_minilm_sentences_dataset()  # doctest: +SKIP
  >>> ds.x_test.shape[0], ds.y_test.shape, ds.x_test.dtype  # doctest: +SKIP
  (200, (200, 384), dtype('int32'))
  """
  x_train, y_train, x_test, y_test = _cached_arrays()
  return Dataset(
    "minilm-sentences", EMBEDDING, x_train, y_train, x_test, y_test,
    num_classes=int(y_test.shape[1]),
  )  # fmt: skip
