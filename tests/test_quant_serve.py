"""Integer serving path for grouped and asymmetric weights: equal to the fake-quant reference."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxshrink.quant import QuantSpec, quantize
from jaxshrink.quant.serve import qarray_matmul, quantized_apply

X = jax.random.normal(jax.random.key(0), (8, 72))
W = jax.random.normal(jax.random.key(1), (72, 24)) + 0.3  # off-centre: zero points matter

SPECS = [
  QuantSpec(bits=8),
  QuantSpec(bits=8, symmetric=False),
  QuantSpec(bits=8, group_size=16),  # 72 = 4 full groups + one padded group of 8
  QuantSpec(bits=8, group_size=16, symmetric=False),
  QuantSpec(bits=4, group_size=32, symmetric=False),
  QuantSpec(bits=4, per_tensor=True, symmetric=False),
  QuantSpec(bits=3, group_size=24),
]


def _w8(q, static=None):
  scale = None if static is None else jnp.asarray([static], jnp.float32)
  return dataclasses.replace(q, act_bits=8, act_scale=scale)


def _fake_act(x, axes, static=None):
  """The activation side of the reference: per-row (or static) absmax int8 fake quantization."""
  x = np.asarray(x, np.float64)
  sx = np.abs(x).max(axis=axes, keepdims=True) / 127 if static is None else static
  return np.clip(np.round(x / sx), -127, 127) * sx


def _products(fn, *args) -> list[tuple[str, ...]]:
  """(operand dtypes..., preferred dtype) of every dot/conv in `fn`'s jaxpr, nested ones too."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
        dtypes = [str(v.aval.dtype) for v in eqn.invars]
        found.append((*dtypes, str(eqn.params["preferred_element_type"])))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize(
  "spec, static",
  [(spec, None) for spec in SPECS] + [(SPECS[3], 0.03)],  # static: calibrated activation scale
  ids=lambda v: v.describe() if isinstance(v, QuantSpec) else f"static={v}",
)
def test_matmul_matches_fake_quant_and_stays_integer(spec, static):
  q = _w8(quantize(W, spec), static)
  y = jax.jit(qarray_matmul)(X, q)
  reference = _fake_act(X, 1, static) @ np.asarray(q.dequantized_matrix(), np.float64)
  np.testing.assert_allclose(np.asarray(y), reference, rtol=1e-5, atol=1e-4)
  assert _products(qarray_matmul, X, q) == [("int8", "int8", "int32")]  # no float dot left


def test_grouped_asymmetric_differs_from_dropping_the_correction():
  """The zero-point term is really applied: without it the result is far off."""
  q = _w8(quantize(W, QuantSpec(bits=8, group_size=16, symmetric=False)))
  no_zp = dataclasses.replace(q, zero_point=jnp.zeros_like(q.zero_point))
  gap = float(jnp.abs(qarray_matmul(X, q) - qarray_matmul(X, no_zp)).max())
  assert gap > 0.5


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), use_bias=False, name="conv")(x)
    return nn.Dense(5, use_bias=False, name="dense")(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize(
  "spec",
  [
    QuantSpec(bits=8, symmetric=False),
    QuantSpec(bits=8, group_size=8, symmetric=False),
    QuantSpec(bits=4, group_size=16),
  ],
  ids=lambda s: s.describe(),
)
def test_quantized_apply_conv_and_dense_grouped_asymmetric(spec):
  model = ConvNet()
  x = jax.random.uniform(jax.random.key(2), (3, 6, 6, 4))
  params = model.init(jax.random.key(3), x)["params"]
  conv = _w8(quantize(params["conv"]["kernel"], spec, contract_dims=(0, 1, 2)))
  dense = _w8(quantize(params["dense"]["kernel"], spec))
  ctree = {"conv": {"kernel": conv}, "dense": {"kernel": dense}}
  apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  y = jax.jit(quantized_apply(apply))(ctree, x)

  xc = _fake_act(x, (1, 2, 3))
  h = lax.conv_general_dilated(
    jnp.asarray(xc, jnp.float32), conv.materialize(), (1, 1), "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST,
  )  # fmt: skip
  h = np.asarray(h, np.float64).reshape(3, -1)
  reference = _fake_act(h, 1) @ np.asarray(dense.dequantized_matrix(), np.float64)
  np.testing.assert_allclose(np.asarray(y), reference, rtol=1e-4, atol=1e-4)
  products = _products(quantized_apply(apply), ctree, x)
  assert products.count(("int8", "int8", "int32")) == 2
  # The replay's unused float ops (conv patches for calibration sites) are dead code: the
  # compiled program's only matmul/conv ops are the two integer ones.
  hlo = jax.jit(quantized_apply(apply)).lower(ctree, x).compile().as_text()
  ops = [ln.split("=")[1].split()[0] for ln in hlo.splitlines()
         if re.search(r"\b(convolution|dot)\(", ln)]  # fmt: skip
  assert ops and all(op.startswith("s32") for op in ops), ops
