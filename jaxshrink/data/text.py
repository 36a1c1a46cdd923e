"""The `stdlib-text` dataset: byte-level language modelling on Python standard-library docstrings.

The corpus needs no download: it is rebuilt from the docstrings of a fixed list of standard-library
modules of the running interpreter and cached under
`cache_dir()/data/stdlib-text-<major>.<minor>-v2.txt` (docstrings change between Python versions).
"""

from __future__ import annotations

import sys

import numpy as np

from jaxshrink.data.cache import atomic_write_bytes, cache_dir
from jaxshrink.data.dataset import LANGUAGE_MODEL, Dataset, freeze_arrays
from jaxshrink.data.stdlib_docs import STDLIB_TEXT_MODULES
from jaxshrink.errors import InvalidValueError, JaxshrinkError

BYTE_VOCAB_SIZE = 256
CONTEXT_LENGTH = 64
STDLIB_TEXT_TEST_FRACTION = 0.1
STDLIB_TEXT_VERSION = "v2"  # v2: built in a clean interpreter (v1 saw what was imported)


def build_stdlib_text(modules: tuple[str, ...] = STDLIB_TEXT_MODULES) -> str:
  """Builds the corpus: module, class, method and function docstrings in a deterministic order.

  It runs `jaxshrink.data.stdlib_docs` in a fresh interpreter with the standard library alone
  (`python -I -S`): libraries loaded in this process patch standard-library classes (transformers
  adds methods to `logging.Logger`, torch replaces functions of `inspect`), and the corpus, and
  every model trained on it, must not depend on what was imported before.

  Args:
    modules: module names, visited in the given order; modules the interpreter lacks (minimal
      builds) are skipped.

  Returns:
    ASCII text, one docstring per paragraph block, separated by blank lines.

  Raises:
    JaxshrinkError: the build process failed (its error output is quoted).
  """
  import subprocess

  from jaxshrink.data import stdlib_docs

  script = stdlib_docs.__file__
  result = subprocess.run(
    [sys.executable, "-I", "-S", script, *modules], capture_output=True, check=False
  )
  if result.returncode != 0:
    raise JaxshrinkError(
      f"building the stdlib-text corpus failed (`{sys.executable} -I -S {script}` exited "
      f"{result.returncode}): {result.stderr.decode(errors='replace')[-500:]}"
    )
  return result.stdout.decode("ascii")


def dataset_key() -> str:
  """What determines the `stdlib-text` corpus: the Python version and the corpus version."""
  return f"py{sys.version_info.major}.{sys.version_info.minor}-{STDLIB_TEXT_VERSION}"


def stdlib_text() -> str:
  """Returns the cached corpus text, building and caching it on first use."""
  version = f"{sys.version_info.major}.{sys.version_info.minor}"
  path = cache_dir() / "data" / f"stdlib-text-{version}-{STDLIB_TEXT_VERSION}.txt"
  if path.exists():
    try:
      return path.read_bytes().decode("ascii")
    except (OSError, UnicodeDecodeError):
      # Writes are atomic, so this is outside damage (a hand edit): the text is cheap to rebuild.
      path.unlink(missing_ok=True)
  text = build_stdlib_text()
  atomic_write_bytes(path, text.encode("ascii"))
  return text


def tokenize_text(text: str | bytes) -> np.ndarray:
  """Byte-level tokens: one int32 token in [0, 256) per UTF-8 byte.

  >>> tokenize_text("hi")
  array([104, 105], dtype=int32)
  """
  data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


def windows(
  tokens: np.ndarray, length: int = CONTEXT_LENGTH, stride: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Cuts a token stream into next-token-prediction windows.

  Window `k` starts at `i = k * stride`: `x = tokens[i:i+length]`, `y = tokens[i+1:i+length+1]`.
  A tail shorter than a full window is dropped.

  Args:
    tokens: (L,) integer tokens.
    length: window length T.
    stride: distance between window starts; defaults to `length` (non-overlapping).

  Returns:
    `(x, y)`, both (N, T) int32 with N = (L - length - 1) // stride + 1 (0 when L <= length).

  >>> x, y = windows(np.arange(10, dtype=np.int32), length=4)
  >>> x.tolist(), y.tolist()
  ([[0, 1, 2, 3], [4, 5, 6, 7]], [[1, 2, 3, 4], [5, 6, 7, 8]])
  """
  if length < 1:
    raise InvalidValueError(f"`length` must be >= 1; got {length}.")
  stride = length if stride is None else stride
  if stride < 1:
    raise InvalidValueError(f"`stride` must be >= 1; got {stride}.")
  tokens = np.asarray(tokens, dtype=np.int32)
  count = max(0, (tokens.shape[0] - length - 1) // stride + 1)
  starts = np.arange(count, dtype=np.int64)[:, None] * stride
  index = starts + np.arange(length, dtype=np.int64)[None, :]
  return tokens[index], tokens[index + 1]


def text_test_dataset(text: str | bytes, name: str, length: int = CONTEXT_LENGTH) -> Dataset:
  """A language-model dataset whose test windows cover all of `text` (no training split).

  Raises:
    JaxshrinkError: when `text` is shorter than one window plus its target byte.
  """
  tokens = tokenize_text(text)
  if tokens.shape[0] < length + 1:
    raise JaxshrinkError(
      f"text source {name!r} has {tokens.shape[0]} bytes; it needs at least {length + 1} "
      f"(one {length}-token window and its next-token target)."
    )
  x_test, y_test = windows(tokens, length)
  empty = np.zeros((0, length), dtype=np.int32)
  arrays = [empty, empty.copy(), x_test, y_test]
  freeze_arrays(*arrays)
  return Dataset(name, LANGUAGE_MODEL, *arrays, num_classes=BYTE_VOCAB_SIZE)


def load_stdlib_text_dataset() -> Dataset:
  """Loads `stdlib-text`: (N, 64) int32 byte windows; the last 10% of the text is the test split.

  >>> ds = load_stdlib_text_dataset()  # doctest: +SKIP
  >>> ds.x_train.shape[1], ds.x_train.dtype, ds.num_classes  # doctest: +SKIP
  (64, dtype('int32'), 256)
  """
  tokens = tokenize_text(stdlib_text())
  split = int(round(tokens.shape[0] * (1.0 - STDLIB_TEXT_TEST_FRACTION)))
  x_train, y_train = windows(tokens[:split], CONTEXT_LENGTH)
  x_test, y_test = windows(tokens[split:], CONTEXT_LENGTH)
  arrays = [x_train, y_train, x_test, y_test]
  freeze_arrays(*arrays)
  return Dataset("stdlib-text", LANGUAGE_MODEL, *arrays, num_classes=BYTE_VOCAB_SIZE)
