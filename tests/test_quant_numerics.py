"""Quantization numerics: specs, scales, codes, packing, QArray round trips and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxshrink import export
from jaxshrink.encoding import materialize
from jaxshrink.quant import (
  QArray,
  QuantSpec,
  compute_qparams,
  dequantize_codes,
  pack_codes,
  quantize,
  quantize_codes,
  unpack_codes,
)

SETTINGS = settings(max_examples=20, deadline=None)
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def matrices(draw):
  # Few distinct shapes keep jit's cache warm; they still cover K < group, K % group != 0.
  k = draw(st.sampled_from([5, 70]))
  n = 3
  return draw(hnp.arrays(np.float32, (k, n), elements=finite))


# A fixed menu (each spec compiles once) spanning bits, symmetry and every granularity.
SPECS = [
  QuantSpec(bits=8),
  QuantSpec(bits=8, symmetric=False, per_tensor=True),
  QuantSpec(bits=4, group_size=16),
  QuantSpec(bits=4, symmetric=False, group_size=64),
  QuantSpec(bits=3, symmetric=False),
  QuantSpec(bits=2, group_size=4),
]


def specs():
  return st.sampled_from(SPECS)


@SETTINGS
@given(matrices(), specs())
def test_error_within_half_step_inside_clip_range(w, spec):
  scale, zp = compute_qparams(jnp.asarray(w), spec)
  codes = quantize_codes(jnp.asarray(w), scale, zp, spec)
  assert codes.dtype == jnp.int32
  assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
  deq = np.asarray(dequantize_codes(codes, scale, zp, spec))
  group = spec.group_size if spec.grouped and spec.group_size <= w.shape[0] else None
  step = np.asarray(jnp.broadcast_to(_rows(scale, w.shape[0], group), w.shape))
  # Scales cover the whole range, so nothing is clipped: the bound holds everywhere.
  assert np.all(np.abs(w - deq) <= step / 2 * (1 + 1e-5) + 1e-30)


def _rows(v, k, group):
  from jaxshrink.quant.numerics import expand_rows

  return expand_rows(v, k, group)


@SETTINGS
@given(matrices(), specs())
def test_quantize_dequantize_requantize_is_identity(w, spec):
  scale, zp = compute_qparams(jnp.asarray(w), spec)
  codes = quantize_codes(jnp.asarray(w), scale, zp, spec)
  again = quantize_codes(dequantize_codes(codes, scale, zp, spec), scale, zp, spec)
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(again))


@SETTINGS
@given(st.sampled_from([2, 3, 4]), st.sampled_from([7, 50]), st.just(3), st.data())
def test_pack_unpack_round_trip_exact(bits, k, n, data):
  qmin = data.draw(st.sampled_from([-(2 ** (bits - 1)), -(2 ** (bits - 1)) + 1]))
  hi = qmin + 2**bits - 1
  codes = data.draw(hnp.arrays(np.int32, (k, n), elements=st.integers(qmin, hi)))
  packed = pack_codes(jnp.asarray(codes), bits=bits, qmin=qmin)
  assert packed.dtype == jnp.uint8
  per, nbytes = {4: (2, 1), 2: (4, 1), 3: (8, 3)}[bits]
  assert packed.shape == (-(-k // per) * nbytes, n)
  back = jax.jit(lambda p: unpack_codes(p, bits=bits, qmin=qmin, k=k))(packed)
  np.testing.assert_array_equal(np.asarray(back), codes)


def test_nibble_layout_is_low_then_high():
  packed = pack_codes(jnp.array([[1], [2], [3]], jnp.int32), bits=4, qmin=0)
  assert packed.ravel().tolist() == [1 | (2 << 4), 3]


@SETTINGS
@given(matrices(), specs())
def test_qarray_round_trip_matches_numerics(w, spec):
  q = quantize(jnp.asarray(w), spec)
  scale, zp = compute_qparams(jnp.asarray(w), spec)
  codes = quantize_codes(jnp.asarray(w), scale, zp, spec)
  np.testing.assert_array_equal(np.asarray(q.unpacked_codes()), np.asarray(codes))
  expected = np.asarray(dequantize_codes(codes, scale, zp, spec))
  np.testing.assert_array_equal(np.asarray(jax.jit(materialize)(q)), expected)


@pytest.mark.parametrize(
  "bits,dtype", [(8, jnp.int8), (4, jnp.uint8), (3, jnp.uint8), (2, jnp.uint8)]
)
def test_code_storage_dtypes_and_conv_layout(bits, dtype):
  w = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
  q = quantize(w, QuantSpec(bits=bits), contract_dims=(0, 1, 2))
  assert q.codes.dtype == dtype and (q.k, q.n) == (36, 8)
  out = materialize(q)
  assert out.shape == w.shape and out.dtype == jnp.float32
  step = np.asarray(q.scale, np.float32).reshape(1, 1, 1, 8)
  assert np.all(np.abs(np.asarray(out) - np.asarray(w)) <= step / 2 * (1 + 1e-5))


def test_int4_group_bytes_per_weight_within_budget():
  w = jax.random.normal(jax.random.key(1), (512, 256))
  for group, symmetric in [(64, True), (128, True), (64, False)]:
    q = quantize(w, QuantSpec(bits=4, group_size=group, symmetric=symmetric))
    assert q.scale.dtype == jnp.bfloat16
    assert q.nbytes / w.size <= 0.55
  assert quantize(w, QuantSpec(bits=4, group_size=128)).nbytes / w.size == 0.5 + 2 / 128
  assert quantize(w, QuantSpec(bits=8)).nbytes == 512 * 256 + 4 * 256


def test_fp8_formats():
  w = jax.random.normal(jax.random.key(2), (64, 16))
  for fmt, dtype in [("fp8_e4m3", jnp.float8_e4m3fn), ("fp8_e5m2", jnp.float8_e5m2)]:
    q = quantize(w, QuantSpec(format=fmt))
    assert q.codes.dtype == dtype
    rel = np.abs(np.asarray(materialize(q)) - np.asarray(w)) / (np.abs(np.asarray(w)) + 1e-3)
    assert rel.max() < (0.07 if fmt == "fp8_e4m3" else 0.13)


def test_stochastic_rounding_is_unbiased():
  w = jnp.full((4096, 1), 0.3, jnp.float32).at[0, 0].set(1.0)
  spec = QuantSpec(bits=2, rounding="stochastic")  # step = 1.0: 0.3 rounds up 30% of the time
  q = quantize(w, spec, key=jax.random.key(0))
  mean = float(materialize(q)[1:].mean())
  assert abs(mean - 0.3) < 0.03
  with pytest.raises(ValueError, match="needs a PRNG `key=`"):
    quantize(w, spec)


def test_group_fallback_warns_and_describes():
  with pytest.warns(UserWarning, match="conv1/kernel"):
    q = quantize(jnp.ones((3, 3, 1, 4)), QuantSpec(bits=4, group_size=128),
                 contract_dims=(0, 1, 2), path="conv1/kernel")  # fmt: skip
  assert q.group_size is None and q.scale.shape == (1, 4)
  assert "g128 > K=9: per-channel" in q.describe()


def test_padding_when_group_does_not_divide():
  w = jax.random.normal(jax.random.key(3), (100, 3))
  q = quantize(w, QuantSpec(bits=4, group_size=32))
  assert q.scale.shape == (4, 3) and q.group_size == 32
  assert materialize(q).shape == (100, 3)


def test_export_round_trip_bit_exact(tmp_path):
  tree = {
    "a": quantize(jax.random.normal(jax.random.key(4), (40, 8)), QuantSpec(bits=3, group_size=16)),
    "b": quantize(
      jax.random.normal(jax.random.key(5), (16, 8)), QuantSpec(bits=8, symmetric=False)
    ),
    "c": quantize(jax.random.normal(jax.random.key(6), (16, 8)), QuantSpec(format="fp8_e4m3")),
  }
  export.save(tmp_path / "ck", tree)
  back = export.load(tmp_path / "ck")
  for name, leaf in tree.items():
    assert isinstance(back[name], QArray) and back[name].describe() == leaf.describe()
    np.testing.assert_array_equal(
      np.asarray(materialize(back[name])), np.asarray(materialize(leaf))
    )


@pytest.mark.parametrize(
  "spec,match",
  [
    (QuantSpec(bits=5), r"Unsupported `bits`=5 for `layer/kernel`"),
    (QuantSpec(bits=4, format="fp8_e4m3"), "stores 8-bit codes"),
    (QuantSpec(format="int3"), "must be one of"),
    (QuantSpec(group_size=0), "group_size` must be >= 1"),
    (QuantSpec(rounding="up"), "rounding` must be one of"),
  ],
)
def test_bad_specs(spec, match):
  with pytest.raises(ValueError, match=match):
    quantize(jnp.ones((4, 4)), spec, path="layer/kernel")


def test_bad_inputs():
  with pytest.raises(ValueError, match=r"axis 3 is out of range for `k`"):
    quantize(jnp.ones((4, 4)), QuantSpec(), contract_dims=(3,), path="k")
  with pytest.raises(TypeError, match="needs a float array; got dtype int32"):
    quantize(jnp.ones((4, 4), jnp.int32), QuantSpec(), path="k")
  with pytest.raises(ValueError, match="`k` holds NaN or Inf"):
    quantize(jnp.array([[1.0, jnp.nan]]), QuantSpec(), path="k")
  with pytest.raises(ValueError, match="`k` holds NaN or Inf"):
    quantize(jnp.array([[1.0, jnp.inf]]), QuantSpec(), path="k")


def test_quantize_and_quantize_params_group_a_conv_kernel_alike():
  from jaxshrink.quant import quantize_params

  kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
  alone = quantize(kernel, QuantSpec(bits=8))
  in_tree = quantize_params({"conv": {"kernel": kernel}}, ".*kernel", QuantSpec(bits=8))
  in_tree = in_tree["conv"]["kernel"]
  assert alone.contract_dims == in_tree.contract_dims == (0, 1, 2)  # one scale per out channel
  np.testing.assert_array_equal(alone.materialize(), in_tree.materialize())
