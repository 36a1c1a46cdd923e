"""Checkpoint bytes against the information limit of every encoding, and digits-cnn W8A8 size.

The information limit of a leaf is what its encoding cannot do without: `bits x count` of the
codes or values, plus every scale and zero point at its stored width, plus the index metadata
(one bit per weight for a bitmask, `ceil(log2 C(m, n))` bits per group for N:M). It is computed
here from the encoding's logical parameters, not from the arrays the checkpoint holds.
"""

import math

import jax
import numpy as np
import pytest

from jaxshrink import export
from jaxshrink.encoding import Encoding
from jaxshrink.lowrank import LowRank, quantize_factors
from jaxshrink.quant import QArray, QuantSpec, quantize
from jaxshrink.sparsity.encodings import BitmaskSparse, NMSparse, _values_encoder

K, N = 256, 1024  # one synthetic kernel: 262144 weights, so 5% is thousands of bytes
SLACK = 1.05  # stored arrays may exceed the information limit by 5%
OVERHEAD = 2048  # bytes: the manifest and orbax metadata of a one-leaf checkpoint


def limit_bits(enc) -> int:
  """The information limit of one (possibly nested) leaf, in bits."""
  if not isinstance(enc, Encoding):
    return 8 * np.dtype(enc.dtype).itemsize * int(np.prod(enc.shape))
  if isinstance(enc, QArray):
    groups = math.ceil(enc.k / enc.group_size) if enc.group_size else 1
    scales = groups * enc.n * 8 * np.dtype(enc.scale.dtype).itemsize
    zero_points = 0 if enc.zero_point is None else groups * enc.n * enc.bits
    return enc.bits * enc.k * enc.n + scales + zero_points
  if isinstance(enc, BitmaskSparse):
    return enc.size + limit_bits(enc.values)
  if isinstance(enc, NMSparse):
    groups = enc.size // enc.m
    return groups * math.ceil(math.log2(math.comb(enc.m, enc.n))) + limit_bits(enc.values)
  if isinstance(enc, LowRank):
    return limit_bits(enc.a) + limit_bits(enc.b)
  raise TypeError(f"no limit defined for {type(enc).__name__}")


def _kernel():
  return np.asarray(jax.random.normal(jax.random.key(0), (K, N)), np.float32)


def _lowrank(w, rank=64):
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  root = np.sqrt(s[:rank])
  return LowRank.from_factors(u[:, :rank] * root, root[:, None] * vt[:rank], shape=w.shape)


def _sparse90(w):
  return w * (np.abs(w) > np.quantile(np.abs(w), 0.9))


ENCODINGS = {
  "int8 per-channel": lambda w: quantize(w, QuantSpec(bits=8)),
  "int4 g32": lambda w: quantize(w, QuantSpec(bits=4, group_size=32)),
  "int4 g128": lambda w: quantize(w, QuantSpec(bits=4, group_size=128)),
  "int3 g128": lambda w: quantize(w, QuantSpec(bits=3, group_size=128)),
  "int2 g128": lambda w: quantize(w, QuantSpec(bits=2, group_size=128)),
  "int4 g128 asymmetric": lambda w: quantize(w, QuantSpec(bits=4, group_size=128, symmetric=False)),
  "bitmask 90% sparse": lambda w: BitmaskSparse.encode(_sparse90(w)),
  "bitmask 90% + int8": lambda w: BitmaskSparse.encode(
    _sparse90(w), values_encoder=_values_encoder(8, "w")
  ),
  "2:4": lambda w: NMSparse.encode(w, 2, 4, axis=0),
  "2:4 + int4": lambda w: NMSparse.encode(w, 2, 4, axis=0, values_encoder=_values_encoder(4, "w")),
  "low-rank r64": _lowrank,
  "low-rank r64 + int8": lambda w: quantize_factors({"w": _lowrank(w)})["w"],
}


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
