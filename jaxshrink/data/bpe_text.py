"""The `corpus-bpe` dataset: English sentences of the offline transfer corpus as BPE token windows.

The text is the transfer corpus of `jaxshrink.data.corpus` (over 25,000 shuffled English
sentences: BSD fortunes and documentation prose; nothing is downloaded). Its last
`TEST_FRACTION` of sentences is the held-out test split. A byte-level BPE tokenizer with
`BPE_VOCAB_SIZE` ids is trained on the training sentences only, with the `tokenizers` package,
and cached as `cache_dir()/data/corpus-bpe-<corpus key>-<vocab>-<version>.json`, so every later
process (and the cached `llama-tiny` weights) sees the same ids. Each split is one token stream,
every sentence followed by the end-of-text id `EOS_ID`, cut into `BPE_CONTEXT`-token windows.

>>> ids = encode("The cat sat.")          # doctest: +SKIP
>>> decode(ids)                           # doctest: +SKIP
'The cat sat.'
"""

from __future__ import annotations

import functools

import numpy as np

from jaxshrink.data.cache import atomic_write_bytes, cache_dir
from jaxshrink.data.dataset import LANGUAGE_MODEL, Dataset, freeze_arrays
from jaxshrink.data.text import windows

BPE_VOCAB_SIZE = 4096
BPE_CONTEXT = 128
TEST_FRACTION = 0.05
# Bump when the tokenizer's training changes, so a cached tokenizer (and the zoo weights keyed
# on this dataset) from the old recipe are not reused.
BPE_VERSION = "v1"
EOS_TOKEN = "<|endoftext|>"
EOS_ID = 0  # the first special token gets id 0


def corpus_split() -> tuple[tuple[str, ...], tuple[str, ...]]:
  """`(train, test)` sentences: the corpus order is already a fixed shuffle, so the tail is
  a random held-out sample."""
  from jaxshrink.data.corpus import transfer_sentences

  sentences = transfer_sentences()
  split = int(round(len(sentences) * (1.0 - TEST_FRACTION)))
  return sentences[:split], sentences[split:]


def train_tokenizer(sentences: tuple[str, ...], vocab_size: int = BPE_VOCAB_SIZE):
  """A byte-level BPE `tokenizers.Tokenizer` trained on `sentences` (every byte encodable)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=2,
    special_tokens=[EOS_TOKEN],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator(sentences, trainer)
  return tokenizer


def dataset_key() -> str:
  """What determines the `corpus-bpe` windows: the corpus sources, vocabulary and version."""
  from jaxshrink.data.corpus import corpus_key

  return f"{corpus_key()}-{BPE_VOCAB_SIZE}-{BPE_VERSION}"


@functools.cache
def tokenizer():
  """The cached corpus tokenizer (trained on the training sentences on first use)."""
  from tokenizers import Tokenizer

  path = cache_dir() / "data" / f"corpus-bpe-{dataset_key()}.json"
  if path.exists():
    try:
      return Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception:  # damaged outside our atomic writes: retrain (deterministic, ~1 s)
      path.unlink(missing_ok=True)
  trained = train_tokenizer(corpus_split()[0])
  atomic_write_bytes(path, trained.to_str().encode("utf-8"))
  # Read back what is on disk: another process may have written it first.
  return Tokenizer.from_str(path.read_text(encoding="utf-8"))


def encode(text: str) -> np.ndarray:
  """(L,) int32 BPE ids of `text` (no end-of-text id added)."""
  return np.asarray(tokenizer().encode(text).ids, np.int32)


def decode(ids) -> str:
  """Text of BPE ids; the end-of-text id is dropped."""
  return tokenizer().decode([int(i) for i in np.asarray(ids).reshape(-1)])


def _stream(sentences: tuple[str, ...]) -> np.ndarray:
  encoded = tokenizer().encode_batch(list(sentences))
  ids = [np.asarray([*e.ids, EOS_ID], np.int32) for e in encoded]
  return np.concatenate(ids) if ids else np.zeros((0,), np.int32)


def load_corpus_bpe_dataset() -> Dataset:
  """Loads `corpus-bpe`: (N, 128) int32 BPE windows, 5% of the sentences held out for test.

  >>> ds = load_corpus_bpe_dataset()  # doctest: +SKIP
  >>> ds.x_train.shape[1], ds.num_classes  # doctest: +SKIP
  (128, 4096)
  """
  train, test = corpus_split()
  x_train, y_train = windows(_stream(train), BPE_CONTEXT)
  x_test, y_test = windows(_stream(test), BPE_CONTEXT)
  arrays = [x_train, y_train, x_test, y_test]
  freeze_arrays(*arrays)
  return Dataset("corpus-bpe", LANGUAGE_MODEL, *arrays, num_classes=BPE_VOCAB_SIZE)
