"""The `Dataset` container every evaluation and training routine consumes."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxshrink.errors import InvalidTypeError, InvalidValueError, JaxshrinkError

CLASSIFICATION = "classification"
LANGUAGE_MODEL = "language-model"
EMBEDDING = "embedding"
KINDS = (CLASSIFICATION, LANGUAGE_MODEL, EMBEDDING)


# eq=False: the fields are arrays, so field-wise `==` would be ambiguous; identity equality keeps
# datasets hashable (usable as cache keys) and cheap to compare.
@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A fixed train/test split held as NumPy arrays.

  Attributes:
    name: registry name ("digits") or the source it was loaded from.
    kind: "classification", "language-model" or "embedding".
    x_train: classification: (N, ...) float32 inputs, e.g. (N, 8, 8, 1) in [0, 1];
      language-model: (N, T) int32 token windows; embedding: (N, L) int32 token ids.
    y_train: classification: (N,) int32 labels; language-model: (N, T) int32 next-token targets;
      embedding: (N, D) float32 target embeddings (a reference model's outputs).
    x_test: same layout as `x_train`.
    y_test: same layout as `y_train`.
    num_classes: number of labels (10 for digits), the vocabulary size (256 for bytes), or the
      embedding width D.

  >>> ds = Dataset("toy", "classification", np.zeros((4, 2), np.float32), np.zeros(4, np.int32),
  ...              np.zeros((2, 2), np.float32), np.zeros(2, np.int32), num_classes=3)
  >>> ds.x_test.shape, ds.y_test.dtype
  ((2, 2), dtype('int32'))
  """

  name: str
  kind: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int

  def __post_init__(self):
    if self.kind not in KINDS:
      raise InvalidValueError(
        f"`kind` must be one of {list(KINDS)}; got {self.kind!r} for dataset {self.name!r}."
      )
    for split in ("train", "test"):
      x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
      if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise InvalidTypeError(
          f"`x_{split}` and `y_{split}` of dataset {self.name!r} must be NumPy arrays; got "
          f"{type(x).__name__} and {type(y).__name__}. Wrap them with `np.asarray`."
        )
      if x.shape[0] != y.shape[0]:
        raise JaxshrinkError(
          f"dataset {self.name!r}: `x_{split}` has {x.shape[0]} examples but `y_{split}` has "
          f"{y.shape[0]}; they must match."
        )
      if self.kind == EMBEDDING:
        if y.ndim != 2 or not np.issubdtype(y.dtype, np.floating):
          raise JaxshrinkError(
            f"embedding dataset {self.name!r} needs (N, D) float `y_{split}` targets; got shape "
            f"{y.shape} and dtype {y.dtype}."
          )
      elif not np.issubdtype(y.dtype, np.integer):
        raise JaxshrinkError(
          f"dataset {self.name!r}: `y_{split}` must hold integer labels; got dtype {y.dtype}."
        )
      if self.kind == LANGUAGE_MODEL and (x.ndim != 2 or x.shape != y.shape):
        raise JaxshrinkError(
          f"language-model dataset {self.name!r} needs (N, T) token windows with "
          f"`x_{split}.shape == y_{split}.shape`; got {x.shape} and {y.shape}."
        )
    if self.num_classes < 1:
      raise InvalidValueError(
        f"`num_classes` must be >= 1; got {self.num_classes} for {self.name!r}."
      )

  @property
  def num_train(self) -> int:
    """Number of training examples (windows for a language model)."""
    return int(self.x_train.shape[0])

  @property
  def num_test(self) -> int:
    """Number of test examples (windows for a language model)."""
    return int(self.x_test.shape[0])


def freeze_arrays(*arrays: np.ndarray) -> None:
  """Marks arrays read-only, so a dataset shared through an in-process cache cannot be altered."""
  for array in arrays:
    array.flags.writeable = False
