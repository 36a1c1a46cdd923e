"""The `digits` dataset: scikit-learn's bundled 8x8 handwritten digits (no download needed)."""

from __future__ import annotations

import numpy as np

from jaxshrink.data.dataset import CLASSIFICATION, Dataset, freeze_arrays

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def dataset_key() -> str:
  """What determines `digits`: the scikit-learn release that ships the images and the split."""
  from importlib.metadata import version

  return f"sklearn{version('scikit-learn')}"


def load_digits_dataset() -> Dataset:
  """Loads the 1797 digits as (N, 8, 8, 1) float32 images in [0, 1] with a fixed split.

  The split is stratified by label and seeded, so it is identical on every run and machine:
  1437 train and 360 test images.

  >>> ds = load_digits_dataset()
  >>> ds.x_train.shape, ds.x_test.shape, ds.x_test.dtype, ds.y_test.dtype
  ((1437, 8, 8, 1), (360, 8, 8, 1), dtype('float32'), dtype('int32'))
  """
  # Imported here: scikit-learn takes ~1 s to import and only this dataset needs it.
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  bunch = load_digits()
  # Raw pixel intensities are integers 0..16.
  images = (bunch.data / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
  labels = bunch.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
    images,
    labels,
    test_size=DIGITS_TEST_FRACTION,
    random_state=DIGITS_SPLIT_SEED,
    stratify=labels,
  )
  arrays = [np.ascontiguousarray(a) for a in (x_train, y_train, x_test, y_test)]
  freeze_arrays(*arrays)
  return Dataset("digits", CLASSIFICATION, *arrays, num_classes=10)
