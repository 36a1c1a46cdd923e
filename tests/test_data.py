"""Tests for jaxshrink.data: cache, digits, stdlib-text, data sources, augmentation."""

from __future__ import annotations

import inspect
import os
import sys
import uuid

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import jaxshrink.data as data
from jaxshrink.data import (
  Dataset,
  atomic_write_bytes,
  cache_dir,
  commit_dir,
  get_dataset,
  list_datasets,
  load_data_source,
  temporary_sibling_dir,
  tokenize_text,
  windows,
)
from jaxshrink.data.augment import random_translate
from jaxshrink.data.digits import load_digits_dataset
from jaxshrink.data.text import (
  STDLIB_TEXT_VERSION,
  build_stdlib_text,
  stdlib_text,
  text_test_dataset,
)
from jaxshrink.errors import JaxshrinkError


def test_public_names():
  public = {
    name
    for name, value in vars(data).items()
    if not name.startswith("_") and not inspect.ismodule(value)
  }
  assert public == {
    "BYTE_VOCAB_SIZE", "CONTEXT_LENGTH", "Dataset", "atomic_write_bytes", "cache_dir",
    "commit_dir", "get_dataset", "import_factory", "list_datasets", "load_data_source",
    "random_translate", "temporary_sibling_dir", "tokenize_text", "windows",
  }  # fmt: skip


# --- cache -------------------------------------------------------------------------------------


def test_cache_dir_env_override(monkeypatch, tmp_path):
  monkeypatch.setenv("JAXSHRINK_CACHE", str(tmp_path / "a" / "b"))
  assert cache_dir() == tmp_path / "a" / "b"
  assert cache_dir().is_dir()


def test_cache_dir_default_under_home(monkeypatch, tmp_path):
  monkeypatch.delenv("JAXSHRINK_CACHE", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert cache_dir() == tmp_path / ".cache" / "jaxshrink"
  assert cache_dir().is_dir()


def test_atomic_write_keeps_existing_and_leaves_no_temp(tmp_path):
  target = tmp_path / "sub" / "file.bin"
  atomic_write_bytes(target, b"first")
  atomic_write_bytes(target, b"second")  # a racing writer: the first complete file wins
  assert target.read_bytes() == b"first"
  assert sorted(os.listdir(target.parent)) == ["file.bin"]


def test_commit_dir_first_rename_wins(tmp_path):
  target = tmp_path / "entry"
  first, second = temporary_sibling_dir(target), temporary_sibling_dir(target)
  (first / "x").write_text("1")
  (second / "x").write_text("2")
  assert commit_dir(first, target) is True
  assert commit_dir(second, target) is False
  assert (target / "x").read_text() == "1"
  assert sorted(os.listdir(tmp_path)) == ["entry"]


# --- digits --------------------------------------------------------------------------------------


def test_digits_shapes_dtypes_ranges():
  ds = get_dataset("digits")
  assert (ds.name, ds.kind, ds.num_classes) == ("digits", "classification", 10)
  assert ds.x_train.shape == (1437, 8, 8, 1) and ds.x_test.shape == (360, 8, 8, 1)
  assert ds.y_train.shape == (1437,) and ds.y_test.shape == (360,)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
  assert set(np.unique(ds.y_test)) == set(range(10))
  # Stratified: every class holds 20% (+-1) of its examples in the test split.
  assert np.bincount(ds.y_test).min() >= 35 and np.bincount(ds.y_test).max() <= 37


def test_digits_split_is_deterministic_and_read_only():
  first, second = load_digits_dataset(), load_digits_dataset()
  np.testing.assert_array_equal(first.x_test, second.x_test)
  np.testing.assert_array_equal(first.y_train, second.y_train)
  assert get_dataset("digits") is get_dataset("digits")
  with pytest.raises(ValueError, match="read-only"):
    get_dataset("digits").x_train[0, 0, 0, 0] = 1.0


def test_unknown_dataset_lists_valid_names():
  assert list_datasets() == ["corpus-bpe", "digits", "minilm-sentences", "stdlib-text"]
  with pytest.raises(JaxshrinkError, match=r"'mnist'.*'corpus-bpe', 'digits', 'minilm-sentences'"):
    get_dataset("mnist")


# --- stdlib-text ---------------------------------------------------------------------------------


def test_stdlib_text_corpus_is_deterministic_ascii_and_cached():
  text = stdlib_text()
  assert text == build_stdlib_text()
  assert 500_000 < len(text) < 3_000_000
  assert text.isascii()
  version = f"{sys.version_info.major}.{sys.version_info.minor}"
  cached = cache_dir() / "data" / f"stdlib-text-{version}-{STDLIB_TEXT_VERSION}.txt"
  assert cached.read_text() == text


def test_stdlib_text_dataset_windows():
  ds = get_dataset("stdlib-text")
  assert (ds.kind, ds.num_classes) == ("language-model", 256)
  for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
    assert x.dtype == np.int32 and y.dtype == np.int32
    assert x.shape == y.shape and x.shape[1] == 64
    assert x.min() >= 0 and x.max() < 128  # ASCII text
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(y[:-1, -1], x[1:, 0])  # stride T: windows tile the stream
  tokens = tokenize_text(stdlib_text())
  test_fraction = ds.num_test / (ds.num_train + ds.num_test)
  assert 0.09 < test_fraction < 0.11
  np.testing.assert_array_equal(ds.x_train[0], tokens[:64])
  split = int(round(0.9 * len(tokens)))
  np.testing.assert_array_equal(ds.x_test[0], tokens[split : split + 64])


def test_stdlib_text_rebuilt_in_fresh_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("JAXSHRINK_CACHE", str(tmp_path))
  text = stdlib_text()
  files = list((tmp_path / "data").iterdir())
  assert [f.name for f in files] == [
    f"stdlib-text-{sys.version_info.major}.{sys.version_info.minor}-{STDLIB_TEXT_VERSION}.txt"
  ]
  files[0].write_bytes(b"\xff\xfe broken")  # non-ASCII: damaged, must be rebuilt
  assert stdlib_text() == text


def test_tokenize_text_bytes():
  np.testing.assert_array_equal(tokenize_text("hé"), np.array([104, 195, 169], np.int32))
  assert tokenize_text(b"ab").dtype == np.int32


def test_windows_exact():
  x, y = windows(np.arange(10, dtype=np.int32), length=4)
  np.testing.assert_array_equal(x, [[0, 1, 2, 3], [4, 5, 6, 7]])
  np.testing.assert_array_equal(y, [[1, 2, 3, 4], [5, 6, 7, 8]])
  x, _ = windows(np.arange(4, dtype=np.int32), length=4)
  assert x.shape == (0, 4)
  with pytest.raises(ValueError, match="`length` must be >= 1"):
    windows(np.arange(4), length=0)


@settings(max_examples=40, deadline=None)
@given(
  size=st.integers(0, 60), length=st.integers(1, 10), stride=st.integers(1, 12)
)  # fmt: skip
def test_windows_match_slicing_reference(size, length, stride):
  tokens = np.arange(size, dtype=np.int32) * 3 % 256
  x, y = windows(tokens, length, stride)
  starts = list(range(0, size - length, stride))
  assert x.shape == y.shape == (len(starts), length)
  for row, start in enumerate(starts):
    np.testing.assert_array_equal(x[row], tokens[start : start + length])
    np.testing.assert_array_equal(y[row], tokens[start + 1 : start + length + 1])


# --- load_data_source ---------------------------------------------------------------------------


def test_source_zoo_name():
  assert load_data_source("digits") is get_dataset("digits")


def test_source_npz_classification(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "images.npz"
  np.savez(path, x_test=rng.random((5, 4, 4, 1)), y_test=np.array([0, 1, 2, 1, 0]))
  ds = load_data_source(str(path))
  assert (ds.kind, ds.num_classes, ds.num_train) == ("classification", 3, 0)
  assert ds.x_test.dtype == np.float32 and ds.y_test.dtype == np.int32
  assert ds.x_train.shape == (0, 4, 4, 1)


def test_source_npz_language_model_with_train_split(tmp_path):
  path = tmp_path / "tokens.npz"
  tokens = np.arange(40, dtype=np.int64).reshape(4, 10)
  np.savez(path, x_test=tokens, y_test=tokens + 1, x_train=tokens[:2], y_train=tokens[:2] + 1)
  ds = load_data_source(str(path))
  assert (ds.kind, ds.num_classes, ds.num_train, ds.num_test) == ("language-model", 256, 2, 4)
  assert ds.x_test.dtype == np.int32


def test_source_npz_missing_keys(tmp_path):
  path = tmp_path / "bad.npz"
  np.savez(path, x=np.zeros(3))
  with pytest.raises(JaxshrinkError, match=r"lacks \['x_test', 'y_test'\]"):
    load_data_source(str(path))


def test_source_txt(tmp_path):
  path = tmp_path / "doc.txt"
  path.write_text("abcdefgh" * 20)  # 160 bytes -> 2 windows of 64
  ds = load_data_source(str(path))
  assert (ds.kind, ds.num_test, ds.num_train) == ("language-model", 2, 0)
  np.testing.assert_array_equal(ds.x_test[0], tokenize_text("abcdefgh" * 8))
  with pytest.raises(JaxshrinkError, match="needs at least 65"):
    text_test_dataset("short", name="short")


def _write_module(tmp_path, monkeypatch, body: str) -> str:
  name = f"user_data_{uuid.uuid4().hex[:8]}"
  (tmp_path / f"{name}.py").write_text(body)
  monkeypatch.syspath_prepend(str(tmp_path))
  return name


def test_source_module_factory(tmp_path, monkeypatch):
  module = _write_module(
    tmp_path,
    monkeypatch,
    "from jaxshrink.data import get_dataset\n"
    "def make():\n  return get_dataset('digits')\n"
    "def wrong():\n  return [1, 2]\n",
  )
  assert load_data_source(f"{module}:make") is get_dataset("digits")
  with pytest.raises(TypeError, match=rf"'{module}:wrong' must return .*Dataset; got list"):
    load_data_source(f"{module}:wrong")
  with pytest.raises(JaxshrinkError, match="has no attribute 'missing'"):
    load_data_source(f"{module}:missing")


@pytest.mark.parametrize(
  ("source", "message"),
  [
    ("nope", r"unknown data source 'nope'; expected a dataset name \['corpus-bpe', 'digits'"),
    ("/no/such/file.npz", r"'/no/such/file.npz' does not exist; expected .*\.npz.*\.txt"),
    ("/no/such/file.txt", r"does not exist"),
    ("no_such_module_xyz:make", r"cannot import module 'no_such_module_xyz'"),
  ],
)
def test_source_errors(source, message):
  with pytest.raises(JaxshrinkError, match=message):
    load_data_source(source)


def test_dataset_validation():
  x, y = np.zeros((3, 2), np.float32), np.zeros(2, np.int32)
  with pytest.raises(JaxshrinkError, match="`x_train` has 3 examples but `y_train` has 2"):
    Dataset("bad", "classification", x, y, x, y, num_classes=2)
  with pytest.raises(ValueError, match="`kind` must be one of"):
    Dataset("bad", "regression", x, x[:, 0].astype(np.int32), x, y, num_classes=2)


# --- augmentation ------------------------------------------------------------------------------


def test_random_translate_is_a_zero_filled_shift():
  images = jnp.asarray(np.random.default_rng(0).random((16, 8, 8, 1)), jnp.float32)
  shifted = np.asarray(jax.jit(random_translate)(jax.random.key(1), images))
  padded = np.pad(np.asarray(images), ((0, 0), (1, 1), (1, 1), (0, 0)))
  for index in range(16):
    candidates = [padded[index, r : r + 8, c : c + 8] for r in range(3) for c in range(3)]
    assert any(np.array_equal(shifted[index], cand) for cand in candidates)
  assert shifted.dtype == np.float32
  np.testing.assert_array_equal(random_translate(jax.random.key(0), images, 0), images)


def test_stdlib_text_does_not_depend_on_what_was_imported(monkeypatch):
  # Libraries patch standard-library classes (transformers adds `logging.Logger` methods); the
  # corpus is built in a clean interpreter, so a patch in this process changes nothing.
  import logging

  before = build_stdlib_text(("logging",))
  monkeypatch.setattr(logging.Logger, "shout", lambda self: None, raising=False)
  logging.Logger.shout.__doc__ = "A method patched in by some library."
  assert build_stdlib_text(("logging",)) == before
  assert "patched in" not in before and "Logger" in before
