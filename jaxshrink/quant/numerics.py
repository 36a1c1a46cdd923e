"""Quantize / dequantize one `(K, N)` matrix: scales, zero points, codes.

Everything here works on the matrix view of a kernel (`capture.kernel_matrix`): rows are the
contracting elements, columns the output channels. Functions are pure and jit-friendly; the
value checks (NaN/Inf) run only on concrete arrays.

Error bound: for `x` inside the clipping range, `|x - dequantize(quantize(x))| <= scale / 2`
(round to nearest), because the code is `round(x / scale + zp)` and dequantization is exact in
float32 up to one rounding.

>>> w = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
>>> spec = QuantSpec(bits=8)
>>> scale, zp = compute_qparams(w, spec)
>>> codes = quantize_codes(w, scale, zp, spec)
>>> scale.shape, codes.dtype, int(codes.max())
((1, 3), dtype('int32'), 127)
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.errors import InvalidTypeError, InvalidValueError
from jaxshrink.quant.spec import FP8_DTYPES, QuantSpec

# Smallest scale: keeps `x / scale` finite for all-zero groups (their codes are then 0).
_TINY = float(np.finfo(np.float32).tiny)

GROUP_FALLBACK_WARNING = (
  "group_size={group} is larger than the contraction length K={k} of `{path}`; it falls back "
  "to one group per output channel (per-channel scales)."
)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_float_matrix(w2d, path: str) -> None:
  """TypeError for integer input, ValueError for a non-matrix or NaN/Inf (when concrete)."""
  dtype = np.dtype(w2d.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise InvalidTypeError(
      f"Quantizing `{path}` needs a float array; got dtype {dtype.name}. Integer leaves are "
      "already codes or indices: exclude them from the rule's `target`."
    )
  if w2d.ndim != 2:
    raise InvalidValueError(
      f"Expected the (K, N) matrix view of `{path}`; got shape {tuple(w2d.shape)}. Use "
      "`quantize(x, spec, contract_dims=...)` for arrays of other ranks."
    )
  if _is_concrete(w2d) and not bool(jnp.all(jnp.isfinite(w2d))):
    raise InvalidValueError(
      f"`{path}` holds NaN or Inf; quantization needs finite weights. Fix the training run "
      "(or restore a finite checkpoint) before quantizing."
    )


def effective_group_size(spec: QuantSpec, k: int, path: str = "<array>") -> int | None:
  """The group size really used for a `K`-row matrix: None means per-channel.

  A group larger than `K` (e.g. g128 on a 3x3x1 conv, K=9) falls back to per-channel, with a
  warning naming `path`.
  """
  if spec.per_tensor or spec.group_size is None:
    return None
  if spec.group_size > k:
    warnings.warn(
      GROUP_FALLBACK_WARNING.format(group=spec.group_size, k=k, path=path), stacklevel=3
    )
    return None
  return int(spec.group_size)


def num_groups(k: int, group_size: int | None) -> int:
  return 1 if group_size is None else math.ceil(k / group_size)


def expand_rows(per_group: jax.Array, k: int, group_size: int | None) -> jax.Array:
  """Broadcasts `(G, N)` per-group values to `(K, N)` rows (G=1 broadcasts everything)."""
  g = per_group.shape[0]
  if g == 1:
    return per_group
  group = int(group_size)
  if g != math.ceil(k / group):
    raise InvalidValueError(
      f"Per-group values of shape {tuple(per_group.shape)} do not fit K={k} rows in groups of "
      f"{group} (expected {math.ceil(k / group)} groups)."
    )
  return jnp.repeat(per_group, group, axis=0, total_repeat_length=g * group)[:k]


def _round_up_to(scale: jax.Array, dtype: str) -> jax.Array:
  """float32 scale values representable in `dtype`, never smaller than the input."""
  if dtype == "float32":
    return scale
  low = scale.astype(dtype)
  up = jnp.where(
    low.astype(jnp.float32) < scale, jnp.nextafter(low, jnp.asarray(jnp.inf, dtype)), low
  )
  return up.astype(jnp.float32)


def compute_qparams(
  w2d: jax.Array, spec: QuantSpec, *, path: str = "<array>"
) -> tuple[jax.Array, jax.Array | None]:
  """Scales (and zero points) covering each group's range without clipping.

  Args:
    w2d: `(K, N)` float matrix.
    spec: the quantization spec.
    path: leaf path for messages.

  Returns:
    `scale` float32 `(G, N)` (`(1, 1)` per-tensor), values exactly representable in
    `spec.scale_dtype`; `zero_point` int32 `(G, N)` in `[qmin, qmax]`, or None if symmetric.
  """
  spec.validate(path)
  check_float_matrix(w2d, path)
  group = effective_group_size(spec, w2d.shape[0], path)
  return _qparams(w2d, spec, group)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _qparams(w2d, spec: QuantSpec, group: int | None):
  w = w2d.astype(jnp.float32)
  k, n = w.shape
  if spec.per_tensor:
    wg = w.reshape(1, k * n, 1)
  elif group is None:
    wg = w.reshape(1, k, n)
  else:
    g = num_groups(k, group)
    wg = jnp.pad(w, ((0, g * group - k), (0, 0))).reshape(g, group, n)
  if spec.symmetric:
    scale = jnp.max(jnp.abs(wg), axis=1) / spec.qmax
    scale = _round_up_to(jnp.maximum(scale, _TINY), spec.scale_dtype)
    return scale, None
  # The range always holds 0, so zero (padding, ReLU outputs, pruned weights) is exact.
  lo = jnp.minimum(jnp.min(wg, axis=1), 0.0)
  hi = jnp.maximum(jnp.max(wg, axis=1), 0.0)
  scale = _round_up_to(jnp.maximum((hi - lo) / (spec.qmax - spec.qmin), _TINY), spec.scale_dtype)
  zero_point = jnp.clip(jnp.round(spec.qmin - lo / scale), spec.qmin, spec.qmax)
  return scale, zero_point.astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(3,))
def quantize_codes(
  w2d: jax.Array,
  scale: jax.Array,
  zero_point: jax.Array | None,
  spec: QuantSpec,
  *,
  key: jax.Array | None = None,
) -> jax.Array:
  """Codes of `w2d` under given scales: int32 `(K, N)` in `[qmin, qmax]` (clipped).

  For fp8 formats the codes are the float8 values themselves (dtype `float8_e4m3fn` /
  `float8_e5m2`), saturated to the format's finite range.
  """
  k = w2d.shape[0]
  v = w2d.astype(jnp.float32) / expand_rows(scale.astype(jnp.float32), k, spec.group_size)
  if spec.format != "int":
    return jnp.clip(v, -spec.qmax, spec.qmax).astype(FP8_DTYPES[spec.format])
  if zero_point is not None:
    v = v + expand_rows(zero_point, k, spec.group_size).astype(jnp.float32)
  if spec.rounding == "stochastic":
    if key is None:
      raise InvalidValueError("Stochastic rounding needs a PRNG `key=`; pass jax.random.key(seed).")
    q = jnp.floor(v + jax.random.uniform(key, v.shape, jnp.float32))
  else:
    q = jnp.round(v)
  return jnp.clip(q, spec.qmin, spec.qmax).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(3,))
def dequantize_codes(
  codes: jax.Array, scale: jax.Array, zero_point: jax.Array | None, spec: QuantSpec
) -> jax.Array:
  """float32 `(K, N)` values `(codes - zero_point) * scale`."""
  k = codes.shape[0]
  q = codes.astype(jnp.float32)
  if zero_point is not None:
    q = q - expand_rows(zero_point, k, spec.group_size).astype(jnp.float32)
  return q * expand_rows(scale.astype(jnp.float32), k, spec.group_size)


def fake_quant(
  w2d: jax.Array, spec: QuantSpec, *, key: jax.Array | None = None, path: str = "<array>"
) -> jax.Array:
  """`dequantize(quantize(w2d))` in one go (no NaN check: usable on tracers)."""
  scale, zp = compute_qparams(w2d, spec, path=path)
  return dequantize_codes(quantize_codes(w2d, scale, zp, spec, key=key), scale, zp, spec)
