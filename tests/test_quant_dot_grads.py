"""Straight-through gradients of every quantized dot mode, for every bit pair and granularity.

The reference is the gradient of the float `lax.dot_general` on the same (unquantized)
operands with the same output cotangent. `int` must equal it; `fake` is the straight-through
gradient through the dequantized operands (quantizers pass gradients unchanged); `int_full`
computes that same gradient with int8 backward matmuls, so it stays within the quantization
error of the operands plus the 8-bit error of the quantized incoming gradient.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxshrink.quant.dot_general import QuantConv, QuantDotGeneral, QuantEinsum

DIMS = (((1,), (0,)), ((), ()))
X = jax.random.normal(jax.random.key(0), (96, 48))
W = jax.random.normal(jax.random.key(1), (48, 24))
R = jax.random.normal(jax.random.key(2), (96, 24))  # output cotangent of the loss


def _fq(x, axes, bits, half):
  """NumPy symmetric absmax fake quantization (the dequantized integer operand)."""
  x = np.asarray(x, np.float64)
  qmax = 2 ** (bits - 1) - 1
  s = np.maximum(np.abs(x).max(axis=axes, keepdims=True), 1e-30) / (qmax + 0.5 * half)
  return np.clip(np.round(x / s), -qmax, qmax) * s


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _nonzero(a):
  return float(np.mean(np.asarray(a) != 0))


@pytest.mark.parametrize("per_tensor", [False, True], ids=["per_token", "per_tensor"])
@pytest.mark.parametrize(
  "weight_bits, activation_bits", list(itertools.product([8, 4, 2], [8, 4, 2]))
)
@pytest.mark.parametrize("mode", ["fake", "int", "int_full"])
def test_grad_is_straight_through(mode, weight_bits, activation_bits, per_tensor):
  for preserve_max_val in (True, False):
    dot = QuantDotGeneral(
      mode=mode, weight_bits=weight_bits, activation_bits=activation_bits,
      per_tensor_activations=per_tensor, preserve_max_val=preserve_max_val,
    )  # fmt: skip
    loss = lambda x, w: jnp.vdot(R, dot(x, w, DIMS))  # noqa: B023, E731
    gx, gw = jax.jit(jax.grad(loss, (0, 1)))(X, W)
    r = np.asarray(R, np.float64)
    ref_x, ref_w = r @ np.asarray(W, np.float64).T, np.asarray(X, np.float64).T @ r
    if mode == "int":  # float backward on the unquantized operands: exact
      np.testing.assert_allclose(np.asarray(gx), ref_x, rtol=1e-6, atol=1e-6 * np.abs(ref_x).max())
      np.testing.assert_allclose(np.asarray(gw), ref_w, rtol=1e-6, atol=1e-6 * np.abs(ref_w).max())
      assert (_nonzero(gx), _nonzero(gw)) == (_nonzero(ref_x), _nonzero(ref_w))
      continue
    # The straight-through gradient through the dequantized operands.
    half = not preserve_max_val
    xq = _fq(X, (0, 1) if per_tensor else (1,), activation_bits, half)
    wq = _fq(W, (0,), weight_bits, half)
    ste_x, ste_w = r @ wq.T, xq.T @ r
    if mode == "fake":
      np.testing.assert_allclose(np.asarray(gx), ste_x, rtol=1e-5, atol=1e-5 * np.abs(ste_x).max())
      np.testing.assert_allclose(np.asarray(gw), ste_w, rtol=1e-5, atol=1e-5 * np.abs(ste_w).max())
      assert (_nonzero(gx), _nonzero(gw)) == (_nonzero(ref_x), _nonzero(ref_w))
      continue
    # int_full: the incoming gradient's int8 codes add ~1% to the operands' own error.
    assert _rel(gx, ste_x) < 0.02 and _rel(gw, ste_w) < 0.02
    assert _rel(gx, ref_x) <= _rel(ste_x, ref_x) + 0.02
    assert _rel(gw, ref_w) <= _rel(ste_w, ref_w) + 0.02
    # An int32 sum of few-level codes can cancel to exactly 0; never more than 1% of entries
    # (the round/clip autodiff this replaces left 94% of them at 0).
    assert _nonzero(gx) >= _nonzero(ref_x) - 0.01 and _nonzero(gw) >= _nonzero(ref_w) - 0.01


@pytest.mark.parametrize(
  "lhs_shape, rhs_shape, dims",
  [
    ((3, 5, 6, 7), (3, 7, 6, 4), (((2, 3), (2, 1)), ((0,), (0,)))),  # batch + 2 contractions
    ((6, 5, 4), (4, 6, 9), (((0, 2), (1, 0)), ((), ()))),  # unsorted contracting axes
  ],
)
def test_int_full_mixed_bits_any_layout(lhs_shape, rhs_shape, dims):
  """W4A8 per-tensor int_full: three int8 dots; gradients track the STE gradient of the
  dequantized operands within 2%."""
  x = jax.random.normal(jax.random.key(4), lhs_shape)
  w = jax.random.normal(jax.random.key(5), rhs_shape)
  r = jax.random.normal(jax.random.key(6), lax.dot_general(x, w, dims).shape)
  dot = QuantDotGeneral(mode="int_full", weight_bits=4, per_tensor_activations=True)
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(r * dot(x, w, dims)), (0, 1)))
  (_, rc), _ = dims
  xq = jnp.asarray(_fq(x, tuple(range(x.ndim)), 8, False), jnp.float32)
  wq = jnp.asarray(_fq(w, tuple(rc), 4, False), jnp.float32)
  ste = jax.grad(lambda a, b: jnp.vdot(r, lax.dot_general(a, b, dims)), (0, 1))(xq, wq)
  for g, e in zip(grad(x, w), ste, strict=True):
    assert g.shape == e.shape and g.dtype == e.dtype
    assert _rel(g, np.asarray(e, np.float64)) < 0.02
  jaxpr = jax.make_jaxpr(grad)(x, w)
  dots = [e for e in _all_eqns(jaxpr.eqns) if e.primitive.name == "dot_general"]
  assert [tuple(str(v.aval.dtype) for v in e.invars) for e in dots] == [("int8", "int8")] * 3


def _all_eqns(eqns):
  for e in eqns:
    yield e
    for sub in jax.extend.core.jaxprs_in_params(e.params):
      yield from _all_eqns(sub.eqns)


@pytest.mark.parametrize("mode", ["int", "int_full"])
def test_einsum_grads(mode):
  """`QuantEinsum` routes through the same custom VJP (W4A8, per-tensor activations)."""
  dot = QuantDotGeneral(mode=mode, weight_bits=4, per_tensor_activations=True)
  x = jax.random.normal(jax.random.key(7), (4, 12, 48))
  r = jax.random.normal(jax.random.key(8), (4, 12, 24))
  loss = lambda e: lambda x, w: jnp.vdot(r, e("btk,kn->btn", x, w))  # noqa: E731
  gx, gw = jax.jit(jax.grad(loss(QuantEinsum(dot)), (0, 1)))(x, W)
  rx, rw = jax.grad(loss(jnp.einsum), (0, 1))(x, W)
  tol = 1e-5 if mode == "int" else 0.2  # int_full: the 4-bit weights' error (~11%) + 8-bit g
  assert _rel(gx, np.asarray(rx, np.float64)) < tol and _rel(gw, np.asarray(rw, np.float64)) < tol
  floor = 1.0 if mode == "int" else 0.99  # int_full: an int32 sum can cancel to exactly 0
  assert _nonzero(rx) == 1.0 and _nonzero(gx) >= floor and _nonzero(gw) >= floor


@pytest.mark.parametrize("groups", [1, 2, 4], ids=["dense", "grouped", "depthwise"])
@pytest.mark.parametrize("weight_bits", [8, 4, 2])
def test_conv_int_grads_are_the_float_conv_grads(groups, weight_bits):
  x = jax.random.normal(jax.random.key(9), (2, 6, 6, 4))
  w = jax.random.normal(jax.random.key(10), (3, 3, 4 // groups, 8))
  kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups)  # fmt: skip
  r = jax.random.normal(jax.random.key(11), (2, 6, 6, 8))
  conv = QuantConv(mode="int", weight_bits=weight_bits, activation_bits=4)
  loss = lambda c: lambda x, w: jnp.vdot(r, c(x, w, **kw))  # noqa: E731
  got = jax.jit(jax.grad(loss(conv), (0, 1)))(x, w)
  ref = jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)
  for g, e in zip(got, ref, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)


def test_conv_refuses_int_full_and_bad_bits():
  with pytest.raises(ValueError, match="QuantConv `mode` must be `fake` or `int`; got 'int_full'"):
    QuantConv(mode="int_full")
  with pytest.raises(ValueError, match="needs weight and activation bits from 2 to 8"):
    QuantConv(mode="int", weight_bits=16)
  with pytest.raises(ValueError, match="Integer modes need weight and activation bits from 2"):
    QuantDotGeneral(mode="int_full", activation_bits=1)


def test_linen_dense_w4_per_tensor_trains():
  """A W4A8 per-tensor Dense gets a dense kernel gradient through linen (was 6% non-zero)."""
  model = nn.Dense(24, use_bias=False, dot_general=QuantDotGeneral(
    mode="int", weight_bits=4, per_tensor_activations=True))  # fmt: skip
  params = {"params": {"kernel": W}}
  g = jax.jit(jax.grad(lambda p: jnp.vdot(R, model.apply(p, X))))(params)["params"]["kernel"]
  np.testing.assert_allclose(np.asarray(g), np.asarray(X.T @ R), rtol=1e-5, atol=1e-4)
