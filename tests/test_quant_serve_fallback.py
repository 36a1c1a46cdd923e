"""W8A8 kernels the integer path cannot take: warned by path, activations still quantized.

Each case runs `quantized_apply` on a layer the int8 path does not cover (depthwise and grouped
convs, a kernel used through a transpose, a reshaped or batched kernel, fp8 conv codes), and
checks that (1) an `IntegerPathWarning` names the leaf and the reason, (2) the output equals
the fake-quant reference (the activation rounded with the integer path's scale, times the
dequantized kernel in float) and differs from the float-activation output, (3) `strict=True`
raises `IntegerPathError`.
"""

import dataclasses
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxshrink.errors import JaxshrinkError
from jaxshrink.quant import QuantSpec, quantize
from jaxshrink.quant.serve import IntegerPathError, IntegerPathWarning, quantized_apply

HIGH = lax.Precision.HIGHEST
IMG = jax.random.uniform(jax.random.key(0), (2, 6, 6, 4)) - 0.3
TOKENS = jax.random.normal(jax.random.key(1), (5, 16))
INT8 = QuantSpec(bits=8)


def _w8(w, spec=INT8, contract_dims=(0,), static=None):
  q = quantize(w, spec, contract_dims=contract_dims)
  scale = None if static is None else jnp.asarray([static], jnp.float32)
  return dataclasses.replace(q, act_bits=8, act_scale=scale)


def _fake_act(x, axes, static=None):
  """NumPy int8 fake quantization: absmax over `axes` (or a static scale)."""
  x = np.asarray(x, np.float64)
  s = np.abs(x).max(axis=axes, keepdims=True) / 127 if static is None else static
  return jnp.asarray(np.clip(np.round(x / s), -127, 127) * s, jnp.float32)


def _conv_model(groups):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(8, (3, 3), feature_group_count=groups, use_bias=False, name="conv")(x)

  return Net()


def _conv_case(groups, spec=INT8):
  model = _conv_model(groups)
  params = model.init(jax.random.key(2), IMG)["params"]
  q = _w8(params["conv"]["kernel"], spec, (0, 1, 2))
  apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731

  def op(x, w):
    return lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups, precision=HIGH,
    )  # fmt: skip

  reference = op(_fake_act(IMG, (1, 2, 3)), q.materialize())  # one scale per example
  return apply, {"conv": {"kernel": q}}, IMG, reference, op(IMG, q.materialize())


def _dot_case(kind):
  key = jax.random.key(3)
  if kind == "transpose":  # tied-embedding style: (V, D) table used as `x @ emb.T`
    q = _w8(jax.random.normal(key, (12, 16)), contract_dims=(1,))
    apply = lambda p, x: jnp.matmul(x, p["emb"].T, precision=HIGH)  # noqa: E731
    dense = q.materialize().T
    path = "emb"
  elif kind == "reshape":  # (D, H, K) kernel flattened to (D, H*K) before the matmul
    q = _w8(jax.random.normal(key, (16, 3, 4)), contract_dims=(0,))
    apply = lambda p, x: jnp.matmul(x, p["w"].reshape(16, 12), precision=HIGH)  # noqa: E731
    dense = q.materialize().reshape(16, 12)
    path = "w"
  else:  # batched: heads are a batch dimension of the kernel
    q = _w8(jax.random.normal(key, (2, 8, 6)), contract_dims=(1,))
    apply = lambda p, x: jnp.einsum(  # noqa: E731
      "thd,hdk->thk", x.reshape(5, 2, 8), p["w"], precision=HIGH
    )
    path = "w"
    xq = _fake_act(TOKENS.reshape(5, 2, 8), (2,))  # per (token, head) over the contraction
    reference = jnp.einsum("thd,hdk->thk", xq, q.materialize(), precision=HIGH)
    float_act = jnp.einsum("thd,hdk->thk", TOKENS.reshape(5, 2, 8), q.materialize(), precision=HIGH)
    return apply, {path: q}, TOKENS, reference, float_act
  reference = jnp.matmul(_fake_act(TOKENS, (1,)), dense, precision=HIGH)
  return apply, {path: q}, TOKENS, reference, jnp.matmul(TOKENS, dense, precision=HIGH)


CASES = {
  "depthwise": (lambda: _conv_case(4), r"`conv/kernel`.*depthwise conv \(feature_group_count=4\)"),
  "grouped": (lambda: _conv_case(2), r"`conv/kernel`.*grouped conv \(feature_group_count=2\)"),
  "fp8_conv": (
    lambda: _conv_case(1, QuantSpec(bits=8, format="fp8_e4m3")),
    r"`conv/kernel`.*fp8_e4m3 codes have no int8 conv",
  ),
  "transpose": (lambda: _dot_case("transpose"), r"`emb`.*reaches its matmul through `transpose`"),
  "reshape": (lambda: _dot_case("reshape"), r"`w`.*reshaped from \(16, 3, 4\) to \(16, 12\)"),
  "batched": (lambda: _dot_case("batched"), r"`w`.*contracted with batch dimensions"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fallback_warns_and_quantizes_activations(case):
  build, pattern = CASES[case]
  apply, ctree, x, reference, float_act = build()
  with pytest.warns(IntegerPathWarning, match=pattern + ".*fake-quantized activations"):
    y = jax.jit(quantized_apply(apply))(ctree, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(reference), rtol=1e-5, atol=1e-5)
  gap = float(jnp.abs(y - float_act).max())
  assert gap > 1e-3 * float(jnp.abs(float_act).max()), gap  # activations really were rounded
  with pytest.raises(IntegerPathError, match=pattern + r".*activation_bits: null"):
    quantized_apply(apply, strict=True)(ctree, x)


def test_static_scale_is_used_by_the_fallback():
  """A calibrated static activation scale applies on the fallback as on the integer path."""
  q = _w8(jax.random.normal(jax.random.key(4), (12, 16)), contract_dims=(1,), static=0.05)
  apply = lambda p, x: jnp.matmul(x, p["emb"].T, precision=HIGH)  # noqa: E731
  with pytest.warns(IntegerPathWarning, match="`emb`"):
    y = quantized_apply(apply)({"emb": q}, TOKENS)
  reference = jnp.matmul(_fake_act(TOKENS, (1,), 0.05), q.materialize().T, precision=HIGH)
  np.testing.assert_allclose(np.asarray(y), np.asarray(reference), rtol=1e-5, atol=1e-5)


def test_unfollowed_op_is_named():
  """A kernel scaled before its matmul cannot be followed: named as float activations."""
  q = _w8(jax.random.normal(jax.random.key(5), (16, 6)))
  apply = lambda p, x: x @ (p["w"] * 2.0)  # noqa: E731
  pattern = r"`w`.*passes through `mul`.*float activations"
  with pytest.warns(IntegerPathWarning, match=pattern):
    y = quantized_apply(apply)({"w": q}, TOKENS)
  np.testing.assert_allclose(np.asarray(y), np.asarray(TOKENS @ (q.materialize() * 2.0)),
                             rtol=1e-5, atol=1e-5)  # fmt: skip
  with pytest.raises(JaxshrinkError, match=pattern):
    quantized_apply(apply, strict=True)({"w": q}, TOKENS)


def test_integer_layers_and_weight_only_stay_silent():
  """Dense W8A8 runs as int8 (no warning, even under strict); weight-only layers never warn."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (3, 3), use_bias=False, name="conv")(x)
      return nn.Dense(5, use_bias=False, name="dense")(x.reshape(x.shape[0], -1))

  model = Net()
  params = model.init(jax.random.key(6), IMG)["params"]
  ctree = {
    "conv": {
      "kernel": quantize(params["conv"]["kernel"], QuantSpec(bits=4), contract_dims=(0, 1, 2))
    },
    "dense": {"kernel": _w8(params["dense"]["kernel"])},
  }
  apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    y = jax.jit(quantized_apply(apply, strict=True))(ctree, IMG)
  assert y.shape == (2, 5) and bool(jnp.all(jnp.isfinite(y)))


def test_embedding_lookup_is_not_a_fallback():
  """A W8A8 table read by `gather` has no activations: no warning, the matmul after is int8."""
  emb = _w8(jax.random.normal(jax.random.key(7), (12, 16)), contract_dims=(1,))
  w = _w8(jax.random.normal(jax.random.key(8), (16, 6)))
  apply = lambda p, ids: p["emb"][ids] @ p["w"]  # noqa: E731
  ids = jnp.asarray([0, 3, 11])
  y = jax.jit(quantized_apply(apply, strict=True))({"emb": emb, "w": w}, ids)
  rows = np.asarray(emb.materialize())[np.asarray(ids)]
  reference = jnp.matmul(_fake_act(rows, (1,)), w.materialize(), precision=HIGH)
  np.testing.assert_allclose(np.asarray(y), np.asarray(reference), rtol=1e-5, atol=1e-5)
