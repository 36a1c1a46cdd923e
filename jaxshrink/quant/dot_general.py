"""AQT-style quantized `dot_general` / `conv_general_dilated`, drop-in for Flax layers.

`QuantDotGeneral(mode=...)` has `lax.dot_general`'s signature, so it is passed as
`nn.Dense(dot_general=...)`, `nn.DenseGeneral`, `nnx.Linear(dot_general=...)`,
`nnx.LinearGeneral`; `QuantEinsum` fits `nnx.Einsum(einsum_op=...)` and `QuantConv` fits
`nn.Conv(conv_general_dilated=...)` / `nnx.Conv`. The right operand is the weight (quantized
per output channel over its contracting axes), the left one the activation (per token, i.e.
per row over its contracting axes, or per tensor).

Modes (any weight/activation bits from 2 to 8, per-token or per-tensor activations; every
one has a straight-through backward, never autodiff through round/clip):
- `fake`: QAT fake quantization with a straight-through estimator (float math): the gradient
  of the float dot at the dequantized operands.
- `int`: int8 x int8 -> int32 forward (`preferred_element_type=jnp.int32`) then rescale; the
  backward pass is the float one of the plain dot on the unquantized operands, so a QAT step
  costs about a float step. Also the dynamic W8A8 serving path for float weights.
- `int_full`: like `int`, and the two backward matmuls are int8 too (AQT's `fully_quantized`,
  with its default `use_fwd_quant`: the backward reuses the forward's codes, only the incoming
  gradient is quantized, to 8 bits per row over each backward contraction); it approximates
  `fake`'s gradient within that 8-bit error.

Weight-only int8/int4 from packed codes and static-scale W8A8 run through `quantized_apply`
(`jaxshrink.quant.serve`), which substitutes each `QArray` kernel's matmul in any model.

>>> dense = nn.Dense(16, dot_general=QuantDotGeneral(mode="int"))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxshrink.errors import InvalidValueError

_EPS = 1e-30


def _qmax(bits: int) -> float:
  return float(2 ** (bits - 1) - 1)


def _scale_over(x: jax.Array, axes: tuple[int, ...], bits: int, half: bool = False) -> jax.Array:
  """Symmetric absmax scale reduced over `axes` (kept as size-1 dims).

  `half=True` maps absmax to `qmax + 0.5` (AQT's `preserve_max_val=False`), so the largest
  value rounds to `qmax` and every code bucket has the same width.
  """
  amax = jnp.max(jnp.abs(x), axis=axes, keepdims=True) if axes else jnp.abs(x)
  return jnp.maximum(amax.astype(jnp.float32), _EPS) / (_qmax(bits) + (0.5 if half else 0.0))


def _int_codes(x: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
  q = jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -_qmax(bits), _qmax(bits))
  return q.astype(jnp.int8)


def ste(x: jax.Array, fq: jax.Array) -> jax.Array:
  """Straight-through: value of `fq`, gradient of identity w.r.t. `x`."""
  return x + lax.stop_gradient(fq - x)


def fake_quant_sym(x: jax.Array, axes: tuple[int, ...], bits: int, half: bool = False) -> jax.Array:
  """Symmetric absmax fake quantization reduced over `axes`, STE gradient (`half` as
  `_scale_over`), so it takes the values the integer modes compute with."""
  s = lax.stop_gradient(_scale_over(x, axes, bits, half))
  fq = jnp.clip(jnp.round(x / s), -_qmax(bits), _qmax(bits)) * s
  return ste(x, fq.astype(x.dtype))


@jax.custom_vjp
def lsq_fake_quant(x: jax.Array, step: jax.Array, bits: int = 8) -> jax.Array:
  """LSQ fake quantization with a learned step size (Esser et al., 2020).

  `step` broadcasts against `x` (e.g. one per output channel) and receives the LSQ gradient,
  scaled by `1/sqrt(numel * qmax)`; `x` gets the clipped straight-through gradient.
  """
  return _lsq_fwd(x, step, bits)[0]


def _lsq_fwd(x, step, bits):
  q = _qmax(bits)
  v = x / step
  return jnp.clip(jnp.round(v), -q, q) * step, (v, step, bits)


def _lsq_bwd(res, g):
  v, step, bits = res
  q = _qmax(bits)
  inside = (v >= -q) & (v <= q)
  gx = jnp.where(inside, g, 0.0)
  dstep = jnp.where(inside, jnp.round(v) - v, jnp.clip(v, -q, q))
  factor = 1.0 / jnp.sqrt(v.size * q)
  gstep = jnp.sum(g * dstep * factor, axis=_reduced_axes(v.shape, step.shape)).reshape(step.shape)
  return gx, gstep, None


def _reduced_axes(full, small):
  small = (1,) * (len(full) - len(small)) + tuple(small)
  return tuple(i for i, (a, b) in enumerate(zip(full, small, strict=True)) if b == 1 and a != 1)


lsq_fake_quant.defvjp(_lsq_fwd, _lsq_bwd)


def _free(ndim, contract, batch):
  return tuple(d for d in range(ndim) if d not in contract and d not in batch)


def _to_out(scale, ndim, contract, batch, lhs_side: bool, n_other_free: int):
  """Moves a `keepdims` operand scale to the dot_general output layout (batch, lhs, rhs)."""
  free = _free(ndim, contract, batch)
  s = jnp.transpose(scale, tuple(batch) + free + tuple(contract))
  s = s.reshape(s.shape[: len(batch) + len(free)])
  ones = (1,) * n_other_free
  if lhs_side:
    return s.reshape(s.shape + ones)
  return s.reshape(s.shape[: len(batch)] + ones + s.shape[len(batch) :])


# Bits of the incoming gradient's codes in `int_full` (AQT's `bwd_bits`), whatever the operand
# bits: the gradient has no forward codes to reuse, and 8 bits keep its error at ~1%.
GRAD_BITS = 8


def _int_forward(lhs, rhs, dimension_numbers, lhs_bits, rhs_bits, lhs_per_tensor, half):
  """int8 x int8 -> int32 dot rescaled to float32, and the codes with their output-layout scales."""
  (lc, rc), (lb, rb) = dimension_numbers
  l_axes = tuple(range(lhs.ndim)) if lhs_per_tensor else lc
  sl, sr = _scale_over(lhs, l_axes, lhs_bits, half), _scale_over(rhs, rc, rhs_bits, half)
  ql, qr = _int_codes(lhs, sl, lhs_bits), _int_codes(rhs, sr, rhs_bits)
  acc = lax.dot_general(ql, qr, dimension_numbers, preferred_element_type=jnp.int32)
  n_lf = len(_free(lhs.ndim, lc, lb))
  n_rf = len(_free(rhs.ndim, rc, rb))
  if lhs_per_tensor:
    sl_out = sl.reshape((1,) * acc.ndim)
  else:
    sl_out = _to_out(sl, lhs.ndim, lc, lb, True, n_rf)
  sr_out = _to_out(sr, rhs.ndim, rc, rb, False, n_lf)
  return acc.astype(jnp.float32) * sl_out * sr_out, (ql, qr, sl_out, sr_out)


def _dims(dimension_numbers):
  """`dimension_numbers` as nested tuples of ints (hashable, for `nondiff_argnums`)."""
  return tuple(tuple(tuple(int(d) for d in axes) for axes in pair) for pair in dimension_numbers)


def int8_dot(lhs, rhs, dimension_numbers, *, lhs_bits=8, rhs_bits=8, lhs_per_tensor=False,
             half=False):  # fmt: skip
  """`lax.dot_general` computed as int8 x int8 -> int32, rescaled to float32 (no custom VJP).

  `rhs` is quantized per output channel (over its contracting axes), `lhs` per token (or per
  tensor). Both use symmetric absmax scales computed on the fly. Differentiate `int_dot_ste`
  instead: autodiff through the rounding here gives zero gradients almost everywhere.
  """
  dims = _dims(dimension_numbers)
  return _int_forward(lhs, rhs, dims, lhs_bits, rhs_bits, lhs_per_tensor, half)[0]


def int_dot_ste(lhs, rhs, dimension_numbers, *, lhs_bits=8, rhs_bits=8, lhs_per_tensor=False,
                half=False, full=False):  # fmt: skip
  """`int8_dot` forward with a straight-through backward, for any bits and lhs granularity.

  `full=False`: the backward is the float one of `lax.dot_general` on the unquantized
  operands. `full=True` (AQT's `fully_quantized` with `use_fwd_quant`): both backward matmuls
  are int8 x int8 -> int32, reusing the forward's codes (whatever their bits) and scales, and
  quantizing only the incoming gradient (`GRAD_BITS`, per row over each backward contraction);
  it approximates the straight-through gradient through the dequantized operands.
  """
  dims = _dims(dimension_numbers)
  return _int_dot_ste(lhs, rhs, dims, lhs_bits, rhs_bits, bool(lhs_per_tensor), bool(half),
                      bool(full))  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _int_dot_ste(lhs, rhs, dimension_numbers, lhs_bits, rhs_bits, lhs_per_tensor, half, full):
  return int8_dot(
    lhs, rhs, dimension_numbers, lhs_bits=lhs_bits, rhs_bits=rhs_bits,
    lhs_per_tensor=lhs_per_tensor, half=half,
  )  # fmt: skip


def _ste_fwd(lhs, rhs, dimension_numbers, lhs_bits, rhs_bits, lhs_per_tensor, half, full):
  out, codes = _int_forward(lhs, rhs, dimension_numbers, lhs_bits, rhs_bits, lhs_per_tensor, half)
  if not full:
    return out, (lhs, rhs)
  # The integer backward needs only the codes and their scales; zero-size arrays carry the
  # operand dtypes (residuals must be arrays).
  return out, (*codes, jnp.zeros((0,), lhs.dtype), jnp.zeros((0,), rhs.dtype))


def _ste_bwd(dimension_numbers, lhs_bits, rhs_bits, lhs_per_tensor, half, full, res, g):
  if not full:
    lhs, rhs = res
    _, vjp = jax.vjp(lambda a, b: lax.dot_general(a, b, dimension_numbers), lhs, rhs)
    gl, gr = vjp(g.astype(jnp.result_type(lhs.dtype, rhs.dtype)))
    return gl.astype(lhs.dtype), gr.astype(rhs.dtype)
  ql, qr, sl_out, sr_out, l_dtype, r_dtype = res
  (lc, rc), (lb, rb) = dimension_numbers
  lf, rf = _free(ql.ndim, lc, lb), _free(qr.ndim, rc, rb)
  nb = len(lb)
  g_batch = tuple(range(nb))
  g_lf = tuple(range(nb, nb + len(lf)))  # gradient axes of the lhs free dims
  g_rf = tuple(range(nb + len(lf), g.ndim))  # ... and of the rhs free dims
  g = g.astype(jnp.float32)
  # d lhs = g . W^T over the rhs free axes; W = qr * sr, so sr moves onto g (per rf element).
  gl = _int8_grad_dot(g * sr_out, qr, g_rf, rf, g_batch, rb, GRAD_BITS, half)
  gl = _to_layout(gl, ql.ndim, lb, lf, lc, rc)
  # d rhs = X^T . g over the lhs free axes; X = ql * sl (per row, or one per tensor), so sl
  # moves onto g.
  gr = _int8_grad_dot(g * sl_out, ql, g_lf, lf, g_batch, lb, GRAD_BITS, half)
  gr = _to_layout(gr, qr.ndim, rb, rf, rc, lc)
  return gl.astype(l_dtype.dtype), gr.astype(r_dtype.dtype)


def _int8_grad_dot(g, codes, g_contract, c_contract, g_batch, c_batch, bits, half):
  """`dot_general(g, codes)` with `g` quantized per row over `g_contract`: int8 -> int32.

  Output layout: batch, g's remaining axes, then `codes`' remaining axes (in axis order).
  """
  sg = _scale_over(g, g_contract, bits, half)
  acc = lax.dot_general(
    _int_codes(g, sg, bits), codes, ((g_contract, c_contract), (g_batch, c_batch)),
    preferred_element_type=jnp.int32,
  )  # fmt: skip
  g_keep = [d for d in range(g.ndim) if d not in g_contract]
  s = sg.reshape([sg.shape[d] for d in g_keep] + [1] * (acc.ndim - len(g_keep)))
  return acc.astype(jnp.float32) * s


def _to_layout(out, ndim, batch, free, contract, other_contract):
  """Gradient from dot_general layout (batch, free, other's kept axes) to the operand's."""
  # The other operand's kept axes are its contracting ones, in its axis order; each pairs
  # with one of this operand's contracting axes.
  order = np.argsort(other_contract)
  position = {d: i for i, d in enumerate(batch)}
  position.update({d: len(batch) + i for i, d in enumerate(free)})
  base = len(batch) + len(free)
  position.update({contract[j]: base + rank for rank, j in enumerate(order)})
  return jnp.transpose(out, [position[d] for d in range(ndim)])


_int_dot_ste.defvjp(_ste_fwd, _ste_bwd)

MODES = ("fake", "int", "int_full")


@dataclasses.dataclass(frozen=True)
class QuantDotGeneral:
  """Drop-in `lax.dot_general` that quantizes both operands (rhs = weight).

  Attributes:
    mode: `fake`, `int` or `int_full` (see the module docstring).
    weight_bits: bits of the weight (rhs), per output channel.
    activation_bits: bits of the activation (lhs); None keeps it float (weight-only, `fake`).
    per_tensor_activations: one activation scale per call instead of one per token.
    preserve_max_val: True maps absmax to `qmax` (as `QArray`s do); False to `qmax + 0.5`,
      AQT's default numerics (then the int8 forward equals `AqtDotGeneral`'s bit for bit).
  """

  mode: str = "fake"
  weight_bits: int = 8
  activation_bits: int | None = 8
  per_tensor_activations: bool = False
  preserve_max_val: bool = True

  def __post_init__(self):
    if self.mode not in MODES:
      raise InvalidValueError(
        f"QuantDotGeneral `mode` must be one of {list(MODES)}; got {self.mode!r}."
      )
    if self.mode != "fake" and (
      self.weight_bits not in range(2, 9) or self.activation_bits not in range(2, 9)
    ):
      raise InvalidValueError(
        f"Integer modes need weight and activation bits from 2 to 8; got weight_bits="
        f"{self.weight_bits}, activation_bits={self.activation_bits}. Use mode `fake` for "
        "weight-only QAT."
      )

  def __call__(
    self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs
  ):
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
    (lc, rc), _ = dimension_numbers
    if self.mode == "fake":
      half = not self.preserve_max_val
      rhs = fake_quant_sym(rhs, tuple(rc), self.weight_bits, half)
      if self.activation_bits is not None:
        axes = tuple(range(lhs.ndim)) if self.per_tensor_activations else tuple(lc)
        lhs = fake_quant_sym(lhs, axes, self.activation_bits, half)
      return lax.dot_general(
        lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type
      )
    out = int_dot_ste(
      lhs, rhs, dimension_numbers, lhs_bits=self.activation_bits, rhs_bits=self.weight_bits,
      lhs_per_tensor=self.per_tensor_activations, half=not self.preserve_max_val,
      full=self.mode == "int_full",
    )  # fmt: skip
    return out.astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class QuantEinsum:
  """Drop-in `jnp.einsum` for `nnx.Einsum(einsum_op=...)`, through `QuantDotGeneral`."""

  dot: QuantDotGeneral = QuantDotGeneral()

  def __call__(self, subscripts, *operands, **kwargs):
    return jnp.einsum(subscripts, *operands, _dot_general=self.dot, **kwargs)


@dataclasses.dataclass(frozen=True)
class QuantConv:
  """Drop-in `lax.conv_general_dilated` (rhs = kernel, per output feature).

  Modes `fake` and `int` as `QuantDotGeneral`: `int` runs an int8 conv with int32
  accumulation and the float backward of the conv on the unquantized operands
  (straight-through); activations use one scale per example. There is no integer conv
  backward, so `int_full` is refused rather than silently run as `int`.
  """

  mode: str = "fake"
  weight_bits: int = 8
  activation_bits: int | None = 8

  def __post_init__(self):
    if self.mode not in ("fake", "int"):
      raise InvalidValueError(
        f"QuantConv `mode` must be `fake` or `int`; got {self.mode!r}. A conv has no integer "
        "backward: use `int` (int8 forward, float straight-through backward)."
      )
    if (
      self.mode == "int"
      and self.activation_bits is not None
      and (self.weight_bits not in range(2, 9) or self.activation_bits not in range(2, 9))
    ):
      raise InvalidValueError(
        f"QuantConv mode `int` needs weight and activation bits from 2 to 8; got weight_bits="
        f"{self.weight_bits}, activation_bits={self.activation_bits}. Use mode `fake`."
      )

  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, batch_group_count=1,
               precision=None, preferred_element_type=None, **kwargs):  # fmt: skip
    kw = dict(
      window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
    )  # fmt: skip
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    w_axes = tuple(d for d in range(rhs.ndim) if d != dn.rhs_spec[0])
    x_axes = tuple(d for d in range(lhs.ndim) if d != dn.lhs_spec[0])
    if self.mode == "fake" or self.activation_bits is None:
      rhs = fake_quant_sym(rhs, w_axes, self.weight_bits)
      if self.activation_bits is not None:
        lhs = fake_quant_sym(lhs, x_axes, self.activation_bits)
      return lax.conv_general_dilated(
        lhs, rhs, precision=precision, preferred_element_type=preferred_element_type, **kw
      )
    out = int8_conv_ste(lhs, rhs, tuple(sorted(kw.items())), self.weight_bits, self.activation_bits)
    return out.astype(preferred_element_type or lhs.dtype)


def int8_conv(lhs, rhs, kw: dict, w_bits: int = 8, a_bits: int = 8, x_scale=None):
  """int8 conv with int32 accumulation; `x_scale` None = one dynamic scale per example."""
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, kw["dimension_numbers"])
  w_axes = tuple(d for d in range(rhs.ndim) if d != dn.rhs_spec[0])
  x_axes = tuple(d for d in range(lhs.ndim) if d != dn.lhs_spec[0])
  sx = _scale_over(lhs, x_axes, a_bits) if x_scale is None else x_scale
  sw = _scale_over(rhs, w_axes, w_bits)
  acc = lax.conv_general_dilated(
    _int_codes(lhs, sx, a_bits), _int_codes(rhs, sw, w_bits), preferred_element_type=jnp.int32,
    **kw,
  )  # fmt: skip
  out_shape = [1] * acc.ndim
  out_shape[dn.out_spec[1]] = sw.size
  batch_shape = [1] * acc.ndim
  batch_shape[dn.out_spec[0]] = sx.size if x_scale is None else 1
  return acc.astype(jnp.float32) * sw.reshape(out_shape) * jnp.reshape(sx, batch_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def int8_conv_ste(lhs, rhs, kw_items, w_bits, a_bits):
  return int8_conv(lhs, rhs, dict(kw_items), w_bits, a_bits)


def _conv_fwd(lhs, rhs, kw_items, w_bits, a_bits):
  return int8_conv(lhs, rhs, dict(kw_items), w_bits, a_bits), (lhs, rhs)


def _conv_bwd(kw_items, w_bits, a_bits, res, g):
  lhs, rhs = res
  _, vjp = jax.vjp(lambda a, b: lax.conv_general_dilated(a, b, **dict(kw_items)), lhs, rhs)
  gl, gr = vjp(g.astype(lhs.dtype))
  return gl, gr


int8_conv_ste.defvjp(_conv_fwd, _conv_bwd)


def dot_general_for(spec_bits: int, activation_bits: int | None, mode: str = "fake") -> Any:
  """A `QuantDotGeneral` for a weight/activation bit pair (recipe helper)."""
  return QuantDotGeneral(mode=mode, weight_bits=spec_bits, activation_bits=activation_bits)
