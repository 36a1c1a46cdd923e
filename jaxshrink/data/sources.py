"""`load_data_source`: one string names any dataset (zoo name, `module:factory`, .npz or .txt)."""

from __future__ import annotations

import importlib
import pathlib
from typing import Any

import numpy as np

from jaxshrink.data.dataset import (
  CLASSIFICATION,
  EMBEDDING,
  KINDS,
  LANGUAGE_MODEL,
  Dataset,
  freeze_arrays,
)
from jaxshrink.data.registry import get_dataset, list_datasets
from jaxshrink.data.text import BYTE_VOCAB_SIZE, text_test_dataset
from jaxshrink.errors import CheckpointError, InvalidTypeError, JaxshrinkError


def _expected_sources() -> str:
  return (
    f"expected a dataset name {list_datasets()}, 'package.module:factory', "
    f"a .npz file, a directory of .npy files or a .txt file"
  )


def import_factory(source: str) -> Any:
  """Imports `"package.module:attr"` (attr may be dotted) and calls it with no arguments.

  Args:
    source: the reference, e.g. `"my_project.data:make_dataset"`.

  Returns:
    Whatever the factory returns; callers check its type.

  Raises:
    JaxshrinkError: when the module cannot be imported or has no such attribute.
  """
  target = import_object(source)
  if not callable(target):
    raise JaxshrinkError(f"{source!r} names a {type(target).__name__}, not a callable factory.")
  return target()


def import_object(source: str) -> Any:
  """Imports `"package.module:attr"` (attr may be dotted) and returns the attribute.

  Only for sources the user types (recipes, flags), never for names read from a checkpoint.

  Raises:
    JaxshrinkError: when the module cannot be imported or has no such attribute.
  """
  module_name, _, attr_path = source.partition(":")
  if not module_name or not attr_path:
    raise JaxshrinkError(f"{source!r} is not of the form 'package.module:factory'.")
  try:
    target = importlib.import_module(module_name)
  except ImportError as exc:
    raise JaxshrinkError(
      f"cannot import module {module_name!r} from {source!r}: {exc}. Check the name and that "
      f"the package is installed or on PYTHONPATH."
    ) from exc
  owner_name = module_name
  for attr in attr_path.split("."):
    if not hasattr(target, attr):
      raise JaxshrinkError(
        f"{source!r}: {owner_name!r} has no attribute {attr!r}; check the name after ':'."
      )
    target = getattr(target, attr)
    owner_name = f"{owner_name}.{attr}"
  return target


ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test", "kind", "num_classes")


def _load_npz(path: pathlib.Path) -> Dataset:
  """Reads x_test/y_test (required) and x_train/y_train, kind, num_classes (optional)."""
  try:
    with np.load(path, allow_pickle=False) as archive:
      arrays = {key: archive[key] for key in archive.files}
  except (OSError, ValueError) as exc:
    raise JaxshrinkError(f"cannot read {str(path)!r} as a NumPy .npz archive: {exc}") from exc
  return dataset_from_arrays(arrays, str(path), "a .npz data source")


def _load_npy_dir(path: pathlib.Path) -> Dataset:
  """A directory holding `x_test.npy`, `y_test.npy` (and optionally the other arrays)."""
  arrays = {}
  for name in ARRAY_NAMES:
    file = path / f"{name}.npy"
    if file.is_file():
      try:
        arrays[name] = np.load(file, allow_pickle=False)
      except (OSError, ValueError) as exc:
        raise JaxshrinkError(f"cannot read {str(file)!r} as a NumPy .npy array: {exc}") from exc
  return dataset_from_arrays(arrays, str(path), "a directory data source (`NAME.npy` files)")


def dataset_from_arrays(arrays: Any, name: str, what: str = "a data source") -> Dataset:
  """A `Dataset` from arrays named like a .npz source's (`x_test`, `y_test` required).

  The split convention: `x_train`/`y_train` feed calibration and training stages;
  `x_test`/`y_test` are held out, only evaluated on. Without a train split, a stage that
  calibrates or trains refuses to run (it never falls back on the test split).
  """
  if not isinstance(arrays, dict):
    arrays = dict(arrays)
  missing = [key for key in ("x_test", "y_test") if key not in arrays]
  if missing:
    raise JaxshrinkError(
      f"{name!r} lacks {missing}; {what} needs `x_test` and `y_test` (optional: `x_train`, "
      f"`y_train`, `kind`, `num_classes`). Found {sorted(arrays)}."
    )
  arrays = {key: np.asarray(value) for key, value in arrays.items()}
  path = name
  x_test = arrays["x_test"]
  if "kind" in arrays:
    kind = str(arrays["kind"])
    if kind not in KINDS:
      raise JaxshrinkError(f"{path!r}: `kind` must be one of {list(KINDS)}; got {kind!r}.")
  else:
    is_tokens = np.issubdtype(x_test.dtype, np.integer) and x_test.ndim == 2
    # Token ids with float (N, D) targets: reference embeddings of a sentence encoder.
    is_embedding = is_tokens and np.issubdtype(arrays["y_test"].dtype, np.floating)
    if is_embedding and arrays["y_test"].ndim == 2:
      kind = EMBEDDING
    else:
      kind = LANGUAGE_MODEL if is_tokens else CLASSIFICATION

  def as_split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if kind == EMBEDDING:
      return x.astype(np.int32), y.astype(np.float32)
    x = x.astype(np.int32) if kind == LANGUAGE_MODEL else x.astype(np.float32)
    return x, y.astype(np.int32)

  x_test, y_test = as_split(x_test, arrays["y_test"])
  if "x_train" in arrays and "y_train" in arrays:
    x_train, y_train = as_split(arrays["x_train"], arrays["y_train"])
  else:
    x_train = np.zeros((0, *x_test.shape[1:]), x_test.dtype)
    y_train = np.zeros((0, *y_test.shape[1:]), y_test.dtype)
  if "num_classes" in arrays:
    num_classes = int(arrays["num_classes"])
  elif kind == EMBEDDING:
    num_classes = int(y_test.shape[1])
  elif kind == LANGUAGE_MODEL:
    num_classes = BYTE_VOCAB_SIZE
  else:
    labels = np.concatenate([y_train.ravel(), y_test.ravel()])
    num_classes = int(labels.max()) + 1 if labels.size else 1
  split_arrays = [np.ascontiguousarray(a) for a in (x_train, y_train, x_test, y_test)]
  freeze_arrays(*split_arrays)
  return Dataset(path, kind, *split_arrays, num_classes=num_classes)


def load_data_source(source: str) -> Dataset:
  """Loads a dataset from any supported source string.

  Args:
    source: one of
      * a name from `list_datasets()`, e.g. `"digits"`;
      * `"package.module:factory"`: `factory()` must return a `Dataset`;
      * a path to a `.npz` file with `x_test`, `y_test` and optionally `x_train`, `y_train`,
        `kind` and `num_classes` (an integer 2-D `x_test` means a language model, or an
        embedding dataset when `y_test` is a float (N, D) array of target embeddings);
      * a path to a directory of `.npy` files named like the `.npz` arrays (`x_test.npy`,
        `y_test.npy`, ...);
      * a path to a `.txt` file: a byte-level language-model dataset whose test windows cover
        the whole file (no training split).
      A factory may also return a mapping of those arrays. `x_train`/`y_train` feed
      calibration and training; `x_test`/`y_test` are held out for evaluation.

  Returns:
    The `Dataset`.

  Raises:
    JaxshrinkError: for a missing file or a source of none of those forms.
    TypeError: when a factory returns something other than a `Dataset`.

  >>> load_data_source("digits").num_classes
  10
  """
  if not isinstance(source, str):
    raise InvalidTypeError(f"`source` must be a str; got {type(source).__name__}.")
  if source in list_datasets():
    return get_dataset(source)
  path = pathlib.Path(source).expanduser()
  suffix = path.suffix.lower()
  if suffix in (".npz", ".txt"):
    if not path.is_file():
      raise JaxshrinkError(f"data source file {source!r} does not exist; {_expected_sources()}.")
    if suffix == ".npz":
      return _load_npz(path)
    return text_test_dataset(path.read_bytes(), name=str(path))
  if path.is_dir():
    return _load_npy_dir(path)
  if ":" in source:
    dataset = import_factory(source)
    if isinstance(dataset, dict):
      return dataset_from_arrays(dataset, source, f"data factory {source!r}")
    if not isinstance(dataset, Dataset):
      raise InvalidTypeError(
        f"data factory {source!r} must return a dict of arrays (`x_test`, `y_test`, ...) or a "
        f"jaxshrink.data.Dataset; got {type(dataset).__name__}."
      )
    return dataset
  raise JaxshrinkError(f"unknown data source {source!r}; {_expected_sources()}.")


def checkpoint_data_source(source: object, *, field: str, where: str) -> Dataset:
  """The dataset a checkpoint's manifest names: a zoo dataset name only.

  A checkpoint is untrusted input: a `module:factory` would run code and a file path would
  read whatever the file names, so both are refused and nothing is imported or opened. The
  user gives such data with `--data` (`load_data_source`).

  Raises:
    CheckpointError: one line naming the field, the value and the fix.

  >>> checkpoint_data_source("digits", field="data", where="ckpt").num_classes
  10
  """
  if isinstance(source, str) and source in list_datasets():
    return get_dataset(source)
  raise CheckpointError(
    f"`{where}`: manifest field `{field}` names {source!r}. A checkpoint may name only a zoo "
    f"dataset ({', '.join(list_datasets())}), never code to import or a file, so nothing was "
    "loaded. Give the data yourself: `--data module:factory` or `--data FILE.npz`."
  )
