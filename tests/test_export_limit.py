"""Checkpoint bytes against the information limit of every encoding, and digits-cnn W8A8 size.

The information limit of a leaf is what its encoding cannot do without: `bits x count` of the
codes or values, plus every scale and zero point at its stored width, plus the index metadata
(one bit per weight for a bitmask, `ceil(log2 C(m, n))` bits per group for N:M). It is computed
from the encoding's logical parameters, not from the arrays the checkpoint holds, by the
`information_limit` benchmark suite, which this test shares.
"""

import importlib.util
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxshrink import export
from jaxshrink.sparsity.encodings import NMSparse


def _limit_suite():
  """The `information_limit` benchmark: its encodings and `limit_bits` are the ones bounded here."""
  path = Path(__file__).resolve().parents[1] / "benchmarks" / "information_limit.py"
  spec = importlib.util.spec_from_file_location("information_limit_suite", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


SUITE = _limit_suite()
ENCODINGS, K, N, limit_bits = SUITE.ENCODINGS, SUITE.K, SUITE.N, SUITE.limit_bits
SLACK = 1.05  # stored arrays may exceed the information limit by 5%
OVERHEAD = 2048  # bytes: the manifest and orbax metadata of a one-leaf checkpoint


def _kernel():
  return np.asarray(jax.random.normal(jax.random.key(0), (K, N)), np.float32)


@pytest.fixture(scope="module")
def kernel():
  return _kernel()


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_disk_bytes_within_5_percent_of_the_information_limit(tmp_path, kernel, name):
  enc = ENCODINGS[name](kernel)
  directory = export.save(tmp_path / "ck", {"dense": {"kernel": enc}})
  limit = limit_bits(enc) / 8
  stored = export.read_manifest(directory)["totals"]["total_bytes"]
  disk = export.disk_bytes(directory)
  assert stored <= SLACK * limit, f"{name}: stored {stored} B vs limit {limit:.0f} B"
  assert disk - stored <= OVERHEAD, f"{name}: {disk - stored} B of manifest and metadata"
  assert disk <= SLACK * limit + OVERHEAD
  back = export.load(directory)["dense"]["kernel"]
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(enc), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit-exact


def test_nm_positions_are_stored_as_pattern_ranks(tmp_path, kernel):
  enc = NMSparse.encode(kernel, 2, 4, axis=0)
  directory = export.save(tmp_path / "ck", {"w": enc})
  leaf = export.read_manifest(directory)["leaves"][0]
  # 3 groups of 4 per byte (6**3 <= 256) instead of 2 bits per kept value (half a byte a group).
  assert leaf["stored_as"] == {"indices": "nm-ranks"}
  assert leaf["arrays"]["indices"] == ["uint8", [math.ceil(K // 4 * N / 3)]]
  assert enc.indices.size == K // 4 * N // 2
  np.testing.assert_array_equal(export.load(directory)["w"].indices, enc.indices)


def test_digits_cnn_w8a8_is_3_9x_smaller_than_float32(tmp_path):
  from jaxshrink import recipes
  from jaxshrink.demo import METHODS, run_method

  base = recipes.prepare(recipes.parse_recipe({"model": "digits-cnn"}, source="test"))
  methods = {m.name: m for m in METHODS}
  f32, _ = run_method(methods["float32"], base, tmp_path)
  w8a8, _ = run_method(methods["W8A8 PTQ"], base, tmp_path)
  ratio = export.disk_bytes(f32) / export.disk_bytes(w8a8)
  assert ratio >= 3.9, ratio
