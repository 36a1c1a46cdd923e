"""Quantized dot_general / conv: Flax integration, jit/grad/vmap, integer path, AQT interop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from jaxshrink.quant import QuantSpec, quantize
from jaxshrink.quant.aqt_interop import aqt_dot_general, jaxshrink_equivalent
from jaxshrink.quant.dot_general import QuantConv, QuantDotGeneral, QuantEinsum, lsq_fake_quant
from jaxshrink.quant.serve import qarray_matmul

X = jax.random.normal(jax.random.key(0), (16, 64))
W = jax.random.normal(jax.random.key(1), (64, 32))


def _reference_int8(x, w, bound=127.0):
  """NumPy W8A8: per-token / per-channel absmax codes, exact integer accumulation."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  sx = np.abs(x).max(1, keepdims=True) / bound
  sw = np.abs(w).max(0, keepdims=True) / bound
  qx = np.clip(np.round(x / sx), -127, 127)
  qw = np.clip(np.round(w / sw), -127, 127)
  return (qx @ qw) * sx * sw


class Dense(nn.Module):
  dg: object

  @nn.compact
  def __call__(self, x):
    return nn.Dense(32, dot_general=self.dg, use_bias=False)(x)


def test_int_mode_matches_numpy_under_jit_and_uses_int32():
  f = jax.jit(lambda x, w: QuantDotGeneral(mode="int")(x, w, (((1,), (0,)), ((), ()))))
  np.testing.assert_allclose(np.asarray(f(X, W)), _reference_int8(X, W), rtol=1e-5, atol=1e-5)
  assert "preferred_element_type=int32" in str(jax.make_jaxpr(f)(X, W))


@pytest.mark.parametrize("mode", ["fake", "int", "int_full"])
def test_linen_dense_grad_and_vmap(mode):
  params = {"params": {"Dense_0": {"kernel": W}}}
  model = Dense(QuantDotGeneral(mode=mode))
  y = jax.jit(model.apply)(params, X)
  assert float(jnp.abs(y - X @ W).max()) < 0.05 * float(jnp.abs(X @ W).max())
  g = jax.jit(jax.grad(lambda p: model.apply(p, X).sum()))(params)["params"]["Dense_0"]["kernel"]
  g_float = X.T @ jnp.ones((16, 32))
  # int: float STE backward (exact); fake: grads see the fake-quantized input; int_full: int8.
  tol = 1e-5 if mode == "int" else 0.05 * float(jnp.abs(g_float).max())
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_float), atol=tol)
  yv = jax.vmap(lambda x: model.apply(params, x))(X.reshape(2, 8, 64))
  assert yv.shape == (2, 8, 32)


def test_linen_dense_general_and_conv():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (3, 3), conv_general_dilated=QuantConv(mode="int"))(x)
      x = nn.DenseGeneral((2, 4), dot_general=QuantDotGeneral(mode="fake"))(x)
      return x

  x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
  m = M()
  params = m.init(jax.random.key(3), x)
  y, g = jax.jit(lambda p: (m.apply(p, x), jax.grad(lambda p: m.apply(p, x).sum())(p)))(params)
  assert y.shape == (2, 6, 6, 2, 4)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g))


def test_nnx_layers():
  rngs = nnx.Rngs(0)
  dg = QuantDotGeneral(mode="int")
  lin = nnx.Linear(64, 32, dot_general=dg, rngs=rngs)
  gen = nnx.LinearGeneral(64, (4, 8), dot_general=dg, rngs=rngs)
  ein = nnx.Einsum("bk,kn->bn", (64, 32), einsum_op=QuantEinsum(dg), rngs=rngs)
  conv = nnx.Conv(3, 8, (3, 3), conv_general_dilated=QuantConv(mode="int"), rngs=rngs)
  np.testing.assert_allclose(
    np.asarray(lin(X)), _reference_int8(X, lin.kernel[...]) + np.asarray(lin.bias[...]),
    rtol=1e-4, atol=1e-4,
  )  # fmt: skip
  assert gen(X).shape == (16, 4, 8)
  assert ein(X).shape == (16, 32)
  assert conv(jnp.ones((1, 5, 5, 3))).shape == (1, 5, 5, 8)


def test_aqt_interop_forward_matches():
  """Same config, same inputs: equal up to float32 rescale rounding (rtol 1e-5)."""
  params = {"params": {"Dense_0": {"kernel": W}}}
  y_aqt = Dense(aqt_dot_general(fwd_bits=8)).apply(params, X, rngs={"params": jax.random.key(0)})
  y_ours = Dense(jaxshrink_equivalent(fwd_bits=8)).apply(params, X)
  np.testing.assert_allclose(np.asarray(y_ours), np.asarray(y_aqt), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(y_ours), _reference_int8(X, W, 127.5), rtol=1e-5, atol=1e-5)
  # Default numerics (absmax -> 127) stay within one code step per operand of AQT's.
  y_default = Dense(QuantDotGeneral(mode="int")).apply(params, X)
  assert float(jnp.abs(y_default - y_aqt).max()) < 0.02 * float(jnp.abs(y_aqt).max())


def test_qarray_matmul_integer_paths():
  q = quantize(W, QuantSpec(bits=8))
  q8 = q.__class__(**{**q.__dict__, "act_bits": 8})
  np.testing.assert_allclose(np.asarray(qarray_matmul(X, q8)), _reference_int8(X, W), rtol=1e-4,
                             atol=1e-4)  # fmt: skip
  q4 = quantize(W, QuantSpec(bits=4, group_size=16))
  np.testing.assert_allclose(np.asarray(qarray_matmul(X, q4)), np.asarray(X @ q4.materialize()),
                             rtol=1e-5, atol=1e-5)  # fmt: skip


def test_lsq_step_gets_gradient():
  step = jnp.full((1, 32), 0.05)
  g = jax.grad(lambda s: jnp.sum(lsq_fake_quant(W, s, 4) ** 2))(step)
  assert g.shape == (1, 32) and float(jnp.abs(g).sum()) > 0


def test_bad_modes():
  with pytest.raises(ValueError, match="mode` must be one of"):
    QuantDotGeneral(mode="int16")
  with pytest.raises(ValueError, match="Integer modes need"):
    QuantDotGeneral(mode="int", weight_bits=16)
  x = jnp.ones((2, 4))
  assert lax.dot_general(x, x.T, (((1,), (0,)), ((), ()))).shape == (2, 2)


@pytest.mark.parametrize(
  "lhs_shape, rhs_shape, dims",
  [
    ((16, 64), (64, 32), (((1,), (0,)), ((), ()))),
    ((3, 5, 6, 7), (3, 7, 6, 4), (((2, 3), (2, 1)), ((0,), (0,)))),  # batch + 2 contractions
    ((6, 5, 4), (4, 6, 9), (((0, 2), (1, 0)), ((), ()))),  # unsorted contracting axes
  ],
)
def test_int8_backward_reuses_forward_codes(lhs_shape, rhs_shape, dims):
  """int_full: three int8 x int8 -> int32 dots (fwd, dlhs, drhs), gradients within 1.5%."""
  x = jax.random.normal(jax.random.key(4), lhs_shape)
  w = jax.random.normal(jax.random.key(5), rhs_shape)
  r = jax.random.normal(jax.random.key(6), lax.dot_general(x, w, dims).shape)
  dot = QuantDotGeneral(mode="int_full")
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(r * dot(x, w, dims)), (0, 1)))
  exact = jax.grad(lambda x, w: jnp.sum(r * lax.dot_general(x, w, dims)), (0, 1))(x, w)
  for g, e in zip(grad(x, w), exact, strict=True):
    assert g.shape == e.shape and g.dtype == e.dtype
    assert float(jnp.abs(g - e).max()) <= 0.015 * float(jnp.abs(e).max())
  eqns = jax.make_jaxpr(grad)(x, w).eqns[0].params["jaxpr"].eqns
  dots = [e for e in _all_eqns(eqns) if e.primitive.name == "dot_general"]
  assert len(dots) == 3
  for e in dots:
    assert [str(v.aval.dtype) for v in e.invars] == ["int8", "int8"]
    assert e.params["preferred_element_type"] == jnp.int32


def _all_eqns(eqns):
  for e in eqns:
    yield e
    for sub in jax.extend.core.jaxprs_in_params(e.params):
      yield from _all_eqns(sub.eqns)


def test_int8_backward_matches_aqt_fully_quantized():
  """Same config (fwd and bwd int8, use_fwd_quant): gradients agree within 1% of their max."""
  params = {"params": {"Dense_0": {"kernel": W}}}
  rng = {"params": jax.random.key(0)}
  aqt_loss = lambda p, x: jnp.sum(jnp.sin(Dense(aqt_dot_general(8, 8)).apply(p, x, rngs=rng)))  # noqa: E731
  ours_loss = lambda p, x: jnp.sum(jnp.sin(Dense(jaxshrink_equivalent(8, 8)).apply(p, x)))  # noqa: E731
  g_aqt = jax.grad(aqt_loss, (0, 1))(params, X)
  g_ours = jax.grad(ours_loss, (0, 1))(params, X)
  for a, b in zip(jax.tree.leaves(g_aqt), jax.tree.leaves(g_ours), strict=True):
    assert float(jnp.abs(a - b).max()) <= 0.01 * float(jnp.abs(a).max())
