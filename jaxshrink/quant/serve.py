"""Running a quantized tree: the integer path for any model, by jaxpr replay.

`quantized_apply(apply_fn)` returns `apply(ctree, *args)` that runs the user's unmodified
`apply_fn` (linen, nnx or pure) on a compressed tree. Every `QArray` is materialized inside
`jit` (weight-only int8/int4: the packed codes are unpacked in the fused consumer), and every
matmul or conv whose kernel is an integer `QArray` with `act_bits` set runs as int8 x int8 ->
int32 (`preferred_element_type=jnp.int32`), then rescales: W8A8 (or W4A8) with dynamic
per-token activation scales, or the static scale found by calibration. Per-group weights give
one int32 partial sum per group, each rescaled by its scale; asymmetric weights subtract the
zero point times the activation codes' (group) sum, in int32. No per-layer injection is
needed: the op is substituted by kernel path in a replay of the traced function
(`capture.replay_with`).

>>> logits = jax.jit(quantized_apply(model.apply))(ctree, x)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxshrink.capture import _dot_input_matrix, replay_with
from jaxshrink.encoding import is_encoding
from jaxshrink.quant.qarray import QArray, from_matrix


def _integer_ok(q: QArray) -> bool:
  """Codes usable by an int8 dot: any integer QArray (grouped and asymmetric included)."""
  return q.format == "int" and q.act_bits is not None


def _act_codes(x, q: QArray, axes):
  qmax = float(2 ** (q.act_bits - 1) - 1)
  if q.act_scale is not None:
    sx = q.act_scale.reshape((1,) * x.ndim).astype(jnp.float32)
  else:
    sx = jnp.maximum(jnp.max(jnp.abs(x), axis=axes, keepdims=True), 1e-30) / qmax
  return jnp.clip(jnp.round(x / sx), -qmax, qmax), sx


def _grouped(values: jax.Array, k: int, group: int) -> jax.Array:
  """`(..., K)` -> `(..., G, g)`, zero-padding K up to whole groups (zeros add nothing)."""
  g = -(-k // group)
  pad = [(0, 0)] * (values.ndim - 1) + [(0, g * group - k)]
  return jnp.pad(values, pad).reshape(*values.shape[:-1], g, group)


def integer_matmul(xq: jax.Array, q: QArray) -> jax.Array:
  """`xq (rows, K) int8 codes @ dequant(q)` as int8 x int8 -> int32 dots, float32 out.

  Per-group weights: the contraction is reshaped into `G` groups and one batched int8 dot
  yields `G` int32 partial sums per output, each rescaled by its group's scale. Asymmetric
  weights (`w = (c - zp) * s`): the zero point comes out of the integer sum as
  `xq · c - (Σ_group xq) * zp`, so codes stay int8 and the correction is exact in int32.
  The activation scale is applied by the caller.
  """
  codes = q.unpacked_codes().astype(jnp.int8)  # (K, N)
  rows, k = xq.shape
  scale = q.scale.astype(jnp.float32)
  if q.group_size is None:  # per-channel / per-tensor: one int8 dot, scale (1, N) or (1, 1)
    acc = lax.dot_general(xq, codes, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    if q.zero_point is not None:
      acc = acc - jnp.sum(xq, axis=1, dtype=jnp.int32)[:, None] * q.zero_point.astype(jnp.int32)
    return acc.astype(jnp.float32) * scale
  xg = jnp.swapaxes(_grouped(xq, k, q.group_size), 0, 1)  # (G, rows, g)
  cg = jnp.swapaxes(_grouped(codes.T, k, q.group_size), 0, 1)  # (G, N, g)
  acc = lax.dot_general(
    xg, cg, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.int32
  )  # (G, rows, N)
  if q.zero_point is not None:
    sums = jnp.sum(xg, axis=2, dtype=jnp.int32)[..., None]  # (G, rows, 1)
    acc = acc - sums * q.zero_point.astype(jnp.int32)[:, None, :]
  return jnp.sum(acc.astype(jnp.float32) * scale[:, None, :], axis=0)


def qarray_matmul(x2d: jax.Array, q: QArray) -> jax.Array:
  """`x2d (rows, K) @ logical(q) (K, N)`, on the integer path when `q.act_bits` is set."""
  x = x2d.astype(jnp.float32)
  if q.input_scale is not None:
    x = x / q.input_scale[None, :]
  if q.act_bits is None:
    return x @ q.dequantized_matrix(with_input_scale=False)
  xq, sx = _act_codes(x, q, (1,))
  if not _integer_ok(q):  # fp8 weights: the same numerics in float
    return (xq * sx) @ q.dequantized_matrix(with_input_scale=False)
  return integer_matmul(xq.astype(jnp.int8), q) * sx


def _dot(params, invals, in_src, qs):
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  w_index = 1 if in_src[1] in qs else 0
  q = qs[in_src[w_index]]
  w, x = invals[w_index], invals[1 - w_index]
  w_contract, x_contract = (rc, lc) if w_index == 1 else (lc, rc)
  if lb or rb or tuple(w.shape) != q.shape or tuple(sorted(w_contract)) != q.contract_dims:
    return None  # the kernel was reshaped on the way: keep the materialized op
  order = np.argsort(w_contract)
  x_sorted = tuple(int(x_contract[i]) for i in order)
  x_free = [x.shape[d] for d in range(x.ndim) if d not in x_contract]
  w_free = [q.shape[d] for d in range(len(q.shape)) if d not in q.contract_dims]
  y = qarray_matmul(_dot_input_matrix(x, x_sorted, ()), q)
  if w_index == 1:
    out = y.reshape(*x_free, *w_free)
  else:
    out = y.T.reshape(*w_free, *x_free)
  return out.astype(params.get("preferred_element_type") or x.dtype)


def _conv_kernel_codes(q: QArray, out_axis: int) -> tuple[jax.Array, int]:
  """int8 conv kernel whose output features are `G*N` per-group codes (+ `G` group masks).

  Output feature `(g, n)` holds `q`'s codes restricted to group `g`'s rows, so one int8 conv
  yields every group's int32 partial sum; for asymmetric weights `G` more all-ones features
  give each group's window sum of activation codes, for the zero-point correction.
  """
  codes = q.unpacked_codes()  # int32 (K, N)
  group = q.group_size or q.k
  g = -(-q.k // group)
  columns = codes
  if g > 1 or q.zero_point is not None:
    member = (jnp.arange(q.k)[:, None] // group == jnp.arange(g)[None, :]).astype(jnp.int32)
    columns = (codes[:, None, :] * member[:, :, None]).reshape(q.k, g * q.n)
    if q.zero_point is not None:
      columns = jnp.concatenate([columns, member], axis=1)
  shape = list(q.shape)
  shape[out_axis] = columns.shape[1]
  return from_matrix(columns.astype(jnp.int8), tuple(shape), q.contract_dims), g


def _conv(params, invals, in_src, qs):
  if in_src[1] not in qs:
    return None
  q, (x, w) = qs[in_src[1]], invals
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  contract = tuple(sorted(d for d in range(w.ndim) if d != rhs_spec[0]))
  if (
    q.act_bits is None
    or not _integer_ok(q)
    or q.input_scale is not None
    or tuple(w.shape) != q.shape
    or contract != q.contract_dims
    or params["feature_group_count"] != 1
    or params["batch_group_count"] != 1
  ):
    return None
  axes = tuple(d for d in range(x.ndim) if d != lhs_spec[0])
  xq, sx = _act_codes(x.astype(jnp.float32), q, axes)
  wq, g = _conv_kernel_codes(q, rhs_spec[0])
  kw = {k: v for k, v in params.items() if k not in ("preferred_element_type", "precision")}
  acc = lax.conv_general_dilated_p.bind(
    xq.astype(jnp.int8), wq, **kw, precision=None, preferred_element_type=np.dtype("int32")
  )
  acc = jnp.moveaxis(acc, out_spec[1], -1)
  main = acc[..., : g * q.n].reshape(*acc.shape[:-1], g, q.n)
  if q.zero_point is not None:
    main = main - acc[..., g * q.n :, None] * q.zero_point.astype(jnp.int32)
  y = jnp.sum(main.astype(jnp.float32) * q.scale.astype(jnp.float32), axis=-2)
  y = jnp.moveaxis(y, -1, out_spec[1])
  batch = [1] * y.ndim
  batch[out_spec[0]] = sx.shape[lhs_spec[0]]
  out = y * sx.reshape(batch)
  return out.astype(params.get("preferred_element_type") or x.dtype)


def quantized_apply(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply(ctree, *args)` running `apply_fn` with every W8A8 `QArray` on the integer path.

  Leaves that are other encodings (or weight-only QArrays) are materialized inside `jit`.
  """

  def apply(ctree, *args):
    leaves, treedef = jax.tree.flatten(ctree, is_leaf=is_encoding)
    qs = {str(i): leaf for i, leaf in enumerate(leaves) if isinstance(leaf, QArray)}
    dense = [leaf.materialize() if is_encoding(leaf) else leaf for leaf in leaves]
    params = jax.tree.unflatten(treedef, dense)

    def substitute(eqn, invals, in_src):
      name = eqn.primitive.name
      if name not in ("dot_general", "conv_general_dilated"):
        return None
      if not any(p in qs for p in in_src[:2]):
        return None
      fn = _dot if name == "dot_general" else _conv
      out = fn(eqn.params, invals, in_src, qs)
      return None if out is None else [out]

    return replay_with(apply_fn, params, args, {int(i): i for i in qs}, substitute)

  return apply
