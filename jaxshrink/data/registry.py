"""Named datasets: `get_dataset("digits")`, `list_datasets()`."""

from __future__ import annotations

import functools
from collections.abc import Callable

from jaxshrink.data import bpe_text, digits, sentences, text
from jaxshrink.data.bpe_text import load_corpus_bpe_dataset
from jaxshrink.data.dataset import Dataset
from jaxshrink.data.digits import load_digits_dataset
from jaxshrink.data.sentences import load_minilm_sentences_dataset
from jaxshrink.data.text import load_stdlib_text_dataset
from jaxshrink.errors import JaxshrinkError

_DATASET_BUILDERS: dict[str, Callable[[], Dataset]] = {
  "corpus-bpe": load_corpus_bpe_dataset,
  "digits": load_digits_dataset,
  "minilm-sentences": load_minilm_sentences_dataset,
  "stdlib-text": load_stdlib_text_dataset,
}


# Cheap keys that change whenever a dataset's content would: a model trained on it is cached
# under its key (`models.pretrained`), so new data never meets weights trained on the old.
_DATASET_KEYS: dict[str, Callable[[], str]] = {
  "corpus-bpe": bpe_text.dataset_key,
  "digits": digits.dataset_key,
  "minilm-sentences": sentences.dataset_key,
  "stdlib-text": text.dataset_key,
}


def dataset_key(name: str) -> str | None:
  """What determines the named dataset's content (versions, not data: nothing is built), or
  None for a source that is not a zoo dataset."""
  key = _DATASET_KEYS.get(name)
  return None if key is None else key()


def tokenizer_files(name: str) -> dict[str, str] | None:
  """Hugging Face tokenizer files (`tokenizer.json`, `tokenizer_config.json`) for the token ids
  of a zoo dataset, so an exported model serves text as it is (`AutoTokenizer`, vLLM); None
  for data without a tokenizer."""
  import json

  if name == "corpus-bpe":
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    return {"tokenizer.json": bpe_text.tokenizer().to_str(), "tokenizer_config.json":
            json.dumps(config)}  # fmt: skip
  if name == "minilm-sentences":
    from jaxshrink.models.minilm import MAX_TOKENS, minilm_files

    special = {f"{k}_token": f"[{k.upper()}]" for k in ("unk", "sep", "pad", "cls", "mask")}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": MAX_TOKENS,
              **special}  # fmt: skip
    tokenizer = (minilm_files() / "tokenizer.json").read_text(encoding="utf-8")
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": json.dumps(config)}
  return None


def list_datasets() -> list[str]:
  """Names accepted by `get_dataset`, sorted.

  >>> list_datasets()
  ['corpus-bpe', 'digits', 'minilm-sentences', 'stdlib-text']
  """
  return sorted(_DATASET_BUILDERS)


# Datasets are built once per process; their arrays are read-only, so sharing them is safe.
@functools.cache
def get_dataset(name: str) -> Dataset:
  """Returns the named offline dataset (built on first use, then shared within the process).

  Args:
    name: one of `list_datasets()`.

  Raises:
    JaxshrinkError: for an unknown name; the message lists the valid names.

  >>> get_dataset("digits").x_test.shape
  (360, 8, 8, 1)
  """
  if name not in _DATASET_BUILDERS:
    raise JaxshrinkError(
      f"unknown dataset {name!r}; valid names are {list_datasets()}. Pass one of those, or load "
      f"your own data with `load_data_source` (module:factory, .npz or .txt)."
    )
  return _DATASET_BUILDERS[name]()
