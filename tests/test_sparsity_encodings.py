"""Sparse encodings: exact round trips under jit, bytes that follow the nonzeros, export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxshrink.encoding import materialize
from jaxshrink.export import disk_bytes, load, save
from jaxshrink.quant import QArray
from jaxshrink.report import tree_report
from jaxshrink.sparsity import NM, BitmaskSparse, NMSparse, Pruner, encode_sparse, nm_mask
from jaxshrink.sparsity.encodings import pack_small, unpack_small


@settings(max_examples=10, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), count=st.integers(1, 40), seed=st.integers(0, 99))
def test_pack_small_round_trip(bits, count, seed):
  codes = np.random.default_rng(seed).integers(0, 2**bits, count)
  packed = pack_small(codes, bits)
  assert packed.dtype == np.uint8 and packed.size == -(-count * bits // 8)
  np.testing.assert_array_equal(np.asarray(unpack_small(jnp.asarray(packed), bits, count)), codes)


@pytest.mark.parametrize("shape", [(7,), (5, 9), (3, 3, 4, 6)])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_bitmask_round_trip_exact(shape, dtype):
  w = np.random.default_rng(0).normal(size=shape).astype(dtype)
  w = np.where(np.abs(w.astype(np.float32)) > 1.0, w, 0).astype(dtype)
  enc = BitmaskSparse.encode(w)
  assert enc.bits.dtype == np.uint8
  np.testing.assert_array_equal(enc.bits, np.packbits((w != 0).ravel()))
  out = jax.jit(materialize)(enc)
  assert out.dtype == jnp.dtype(dtype) and out.shape == shape
  np.testing.assert_array_equal(np.asarray(out), w)
  nnz = int((w != 0).sum())
  assert enc.nbytes == -(-w.size // 8) + nnz * np.dtype(dtype).itemsize


def test_bitmask_all_zero():
  enc = BitmaskSparse.encode(np.zeros((4, 4), np.float32))
  np.testing.assert_array_equal(np.asarray(enc.materialize()), np.zeros((4, 4)))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("shape,axis", [((16, 6), 0), ((3, 3, 8, 5), -2), ((6, 16), -1)])
def test_nm_round_trip_exact(n, m, shape, axis):
  w = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  pruned = w * np.asarray(nm_mask(jnp.abs(w), n, m, axis))
  enc = NMSparse.encode(pruned, n, m, axis)
  np.testing.assert_array_equal(np.asarray(jax.jit(materialize)(enc)), pruned)
  index_bits = {4: 2, 8: 4}[m]
  assert enc.nbytes == pruned.size * n // m * 4 + -(-pruned.size * n // m * index_bits // 8)


def test_nm_rejects_non_nm_mask():
  with pytest.raises(ValueError, match="not 2:4 sparse"):
    NMSparse.encode(np.ones((8, 2), np.float32), 2, 4, 0, mask=np.ones((8, 2), bool))
  with pytest.raises(ValueError, match="divisible by M=4"):
    NMSparse.encode(np.ones((6, 2), np.float32), 2, 4, 0)


def test_quantized_nonzeros_nest_a_qarray():
  rng = np.random.default_rng(2)
  params = {"d": {"kernel": rng.normal(size=(64, 32)).astype(np.float32)}}
  masks = Pruner(".*kernel", 0.9).masks(params)
  pruned = {"d": {"kernel": np.asarray(params["d"]["kernel"] * masks["d"]["kernel"])}}
  enc = encode_sparse(pruned, ".*kernel", quantize_nonzeros=8)["d"]["kernel"]
  assert isinstance(enc.values, QArray) and enc.values.bits == 8
  out = np.asarray(jax.jit(materialize)(enc))
  np.testing.assert_array_equal(out != 0, pruned["d"]["kernel"] != 0)
  scale = np.abs(pruned["d"]["kernel"]).max() / 127
  np.testing.assert_allclose(out, pruned["d"]["kernel"], atol=0.51 * scale)
  nm = encode_sparse(pruned, ".*kernel", structure=NM(2, 4, 0), quantize_nonzeros=4)
  assert nm["d"]["kernel"].bits_per_weight <= 3.5  # 2 value bits + 1 index bit + scales


def test_export_round_trip_and_disk_bytes(tmp_path):
  rng = np.random.default_rng(3)
  params = {
    "a": {
      "kernel": rng.normal(size=(256, 256)).astype(np.float32),
      "bias": np.zeros(256, np.float32),
    },
    "b": {"kernel": rng.normal(size=(256, 128)).astype(np.float32)},
  }
  masks = Pruner(".*kernel", 0.9).masks(params)
  pruned = jax.tree.map(lambda w, m: np.asarray(w * m), params, masks)
  ctree = encode_sparse(pruned, ".*kernel")
  save(tmp_path / "float", params)
  save(tmp_path / "sparse", ctree)
  save(tmp_path / "int8", encode_sparse(pruned, ".*kernel", quantize_nonzeros=8))
  dense = load(tmp_path / "sparse", dense=True)
  np.testing.assert_array_equal(dense["a"]["kernel"], pruned["a"]["kernel"])
  back = load(tmp_path / "sparse")
  assert isinstance(back["b"]["kernel"], BitmaskSparse)
  f32 = disk_bytes(tmp_path / "float")
  assert f32 / disk_bytes(tmp_path / "sparse") > 6.0
  assert f32 / disk_bytes(tmp_path / "int8") > 15.0
  report = {leaf.path: leaf for leaf in tree_report(ctree).layers}
  assert report["a/kernel"].sparsity == pytest.approx(0.9, abs=1e-3)
  assert report["a/kernel"].encoding == "bitmask"


@pytest.mark.parametrize("quantize_nonzeros", [None, 4])
def test_structure_string_is_parsed_like_the_pruner(quantize_nonzeros):
  rng = np.random.default_rng(3)
  w = rng.normal(size=(16, 6)).astype(np.float32)
  pruned = {"d": {"kernel": np.where(np.asarray(nm_mask(jnp.abs(w), 2, 4)), w, 0)}}
  by_string = encode_sparse(
    pruned, ".*kernel", structure="2:4", quantize_nonzeros=quantize_nonzeros
  )
  by_object = encode_sparse(
    pruned, ".*kernel", structure=NM(2, 4), quantize_nonzeros=quantize_nonzeros
  )
  s, o = by_string["d"]["kernel"], by_object["d"]["kernel"]
  assert isinstance(s, NMSparse) and (s.n, s.m, s.axis) == (o.n, o.m, o.axis) == (2, 4, 0)
  for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(o), strict=True):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(materialize(s)), np.asarray(materialize(o)))
  # "unstructured" (and structures other than N:M) keep the bitmask.
  bitmask = encode_sparse(pruned, ".*kernel", structure="unstructured")["d"]["kernel"]
  assert isinstance(bitmask, BitmaskSparse) and bitmask.nnz == 48


@pytest.mark.parametrize(
  ("structure", "error", "match"),
  [
    ("2-4", ValueError, r"Unknown structure '2-4'; expected one of unstructured, 'N:M'"),
    ("5:4", ValueError, r"N:M needs 0 < N <= M .* got N=5, M=4"),
    (24, TypeError, r"`structure` must be a string such as '2:4'; got int"),
  ],
)
def test_bad_structure_string_raises(structure, error, match):
  pruned = {"d": {"kernel": np.zeros((8, 4), np.float32)}}
  with pytest.raises(error, match=match):
    encode_sparse(pruned, ".*kernel", structure=structure)
