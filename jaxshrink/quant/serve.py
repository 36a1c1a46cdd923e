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

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxshrink.capture import (
  CONTROL_FLOW,
  FOLLOWED_OPS,
  LAYOUT_OPS,
  Derived,
  LayerSlice,
  _dot_input_matrix,
  replay_with,
)
from jaxshrink.encoding import is_encoding
from jaxshrink.errors import JaxshrinkError
from jaxshrink.quant.qarray import QArray, from_matrix
from jaxshrink.quant.streamed import STREAM_ROWS, chunk_rows, streamed_matmul
from jaxshrink.tree import params_of, path_string


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


def _compute_dtype(x: jax.Array) -> Any:
  """The matmul's input dtype: the activations' float dtype (bf16 models multiply in bf16)."""
  return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32


def qarray_matmul(x2d: jax.Array, q: QArray) -> jax.Array:
  """`x2d (rows, K) @ logical(q) (K, N)`, on the integer path when `q.act_bits` is set.

  Weight-only kernels multiply in the activations' dtype (a bf16 model's matmul stays bf16)
  and accumulate in float32; the integer path accumulates int8 products in int32. The result
  is float32; the caller casts it to the op's output dtype.
  """
  x = x2d.astype(jnp.float32)
  if q.input_scale is not None:
    x = x / q.input_scale[None, :]
  if q.act_bits is None:
    dtype = _compute_dtype(x2d)
    if x2d.shape[0] <= STREAM_ROWS and chunk_rows(q) is not None:  # decoding: stream the codes
      return streamed_matmul(x, q, dtype)
    # The decode reads only the codes, so XLA may schedule every layer's decode first and hold
    # all the float weights at once (a prefill then peaked above the float model). A zero
    # computed from this layer's input, added to the scales, makes each kernel's decode wait
    # for its layer (an optimization barrier is removed before XLA schedules).
    first = x[0, 0]
    tie = jnp.where(jnp.isfinite(first), first, 0.0) * 0.0
    q = dataclasses.replace(q, scale=q.scale + tie.astype(q.scale.dtype))
    w = q.dequantized_matrix(with_input_scale=False).astype(dtype)
    return lax.dot(x.astype(dtype), w, preferred_element_type=jnp.float32)
  xq, sx = _act_codes(x, q, (1,))
  if not _integer_ok(q):  # fp8 weights: the same numerics in float
    return (xq * sx) @ q.dequantized_matrix(with_input_scale=False)
  return integer_matmul(xq.astype(jnp.int8), q) * sx


def gather_rows(q: QArray, ids: jax.Array) -> jax.Array:
  """Rows `ids` of a `(vocab, dim)` table quantized over `dim` (`contract_dims == (1,)`).

  Only the gathered rows are decoded: the table's matrix view is `(dim, vocab)`, so the codes,
  scales and zero points of a token are column `id` of each; those columns form a smaller
  QArray of the same spec, which decodes through the same numerics as the whole table. Ids
  out of range are clipped (as `gather`'s `CLIP` mode does).

  Returns:
    `(*ids.shape, dim)` in the table's logical dtype.

  >>> gather_rows(quantize(table, QuantSpec(bits=8), contract_dims=(1,)), ids).shape
  (2, 16, 384)
  """
  flat = ids.reshape(-1).astype(jnp.int32)

  def columns(a, shared=False):
    # Per-tensor scales and zero points serve every row.
    return a if a is None or shared else jnp.take(a, flat, axis=1, mode="clip")

  rows = dataclasses.replace(
    q, codes=columns(q.codes), scale=columns(q.scale, q.per_tensor),
    zero_point=columns(q.zero_point, q.per_tensor),
    shape=(flat.shape[0], q.shape[1]), n=int(flat.shape[0]),
  )  # fmt: skip
  out = rows.dequantized_matrix().T.reshape(*ids.shape, q.shape[1])
  return out.astype(q.dtype)


def row_lookup(params, operand_shape, indices_shape) -> bool:
  """True for a `gather` that reads whole rows of a 2-D table (`jnp.take(table, ids, 0)`)."""
  dn = params["dimension_numbers"]
  return (
    len(operand_shape) == 2
    and tuple(dn.collapsed_slice_dims) == (0,)
    and tuple(dn.start_index_map) == (0,)
    and not tuple(dn.operand_batching_dims)
    and tuple(dn.offset_dims) == (len(indices_shape) - 1,)
    and tuple(params["slice_sizes"]) == (1, operand_shape[1])
    and indices_shape[-1:] == (1,)
  )


def lookup_rows(params, invals, q: QArray):
  """A row lookup of a table quantized per row: the rows, decoded alone; else None."""
  table, indices = invals[0], invals[1]
  if (
    q.contract_dims != (1,)
    or tuple(table.shape) != q.shape
    or not row_lookup(params, table.shape, indices.shape)
  ):
    return None
  ids = indices[..., 0]
  rows = gather_rows(q, ids).astype(table.dtype)
  if params["mode"] == lax.GatherScatterMode.FILL_OR_DROP:  # `jnp.take`'s default: fill
    fill = params.get("fill_value")
    fill = (jnp.nan if jnp.issubdtype(table.dtype, jnp.inexact) else 0) if fill is None else fill
    valid = (ids >= 0) & (ids < q.shape[0])
    rows = jnp.where(valid[..., None], rows, jnp.asarray(fill, table.dtype))
  return [rows]


def _dot(params, invals, w_index, q):
  """`(out, None)` on the integer path, else `(None, why)`; fp8 gives `(out, why)`."""
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  w, x = invals[w_index], invals[1 - w_index]
  w_contract, x_contract = (rc, lc) if w_index == 1 else (lc, rc)
  if lb or rb:
    return None, "it is contracted with batch dimensions (a batched matmul)"
  if tuple(w.shape) != q.shape:
    return None, f"it is reshaped from {q.shape} to {tuple(w.shape)} before its matmul"
  if tuple(sorted(w_contract)) != q.contract_dims:
    return None, (
      f"its matmul contracts axes {tuple(sorted(w_contract))}, but it was quantized over "
      f"{q.contract_dims}"
    )
  order = np.argsort(w_contract)
  x_sorted = tuple(int(x_contract[i]) for i in order)
  x_free = [x.shape[d] for d in range(x.ndim) if d not in x_contract]
  w_free = [q.shape[d] for d in range(len(q.shape)) if d not in q.contract_dims]
  y = qarray_matmul(_dot_input_matrix(x, x_sorted, ()), q)
  if w_index == 1:
    out = y.reshape(*x_free, *w_free)
  else:
    out = y.T.reshape(*w_free, *x_free)
  out = out.astype(params.get("preferred_element_type") or x.dtype)
  fp8 = q.act_bits is not None and not _integer_ok(q)
  return out, (f"its {q.format} codes have no int8 product" if fp8 else None)


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


def _conv_refusal(q: QArray, params, w) -> str | None:
  """Why the integer conv cannot take this kernel, or None."""
  lhs_spec, rhs_spec, _ = params["dimension_numbers"]
  contract = tuple(sorted(d for d in range(w.ndim) if d != rhs_spec[0]))
  groups = params["feature_group_count"]
  if not _integer_ok(q):
    return f"its {q.format} codes have no int8 conv"
  if q.input_scale is not None:
    return "it carries a SmoothQuant input scale, which the integer conv does not apply"
  if tuple(w.shape) != q.shape:
    return f"it is reshaped from {q.shape} to {tuple(w.shape)} before its conv"
  if contract != q.contract_dims:
    return f"its conv contracts axes {contract}, but it was quantized over {q.contract_dims}"
  if groups != 1:
    kind = "depthwise" if w.shape[rhs_spec[1]] == 1 else "grouped"
    return f"it is a {kind} conv (feature_group_count={groups}); the integer conv is ungrouped"
  if params["batch_group_count"] != 1:
    return f"its conv has batch_group_count={params['batch_group_count']}"
  return None


def _conv(params, invals, q):
  """The integer conv of a kernel `_conv_refusal` accepts (float32 rescale, then cast)."""
  x = invals[0]
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
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


def fake_quant_activation(x: jax.Array, q: QArray, axes: tuple[int, ...]) -> jax.Array:
  """`x` rounded to the codes the integer path would give it, dequantized (x's dtype).

  One scale per slice over `axes` (a dot's contracting axes: per token; all but a conv's
  batch axis: per example), or the calibrated static scale. A SmoothQuant static scale was
  calibrated for `x / input_scale`, which a fallback cannot form, so those use dynamic scales.
  """
  static = q if q.input_scale is None else dataclasses.replace(q, act_scale=None)
  xq, sx = _act_codes(x.astype(jnp.float32), static, axes)
  return (xq * sx).astype(x.dtype)


class IntegerPathError(JaxshrinkError):
  """`quantized_apply(..., strict=True)`: a W8A8 kernel cannot run on the integer path."""


class IntegerPathWarning(UserWarning):
  """A W8A8 kernel runs in float (fake-quantized activations), not on the integer path."""


_FIX = (
  "Store the kernel in the shape and layout its op consumes (and quantize it with matching "
  "`contract_dims`), or quantize it weight-only (`activation_bits: null`)"
)


def leaf_paths(tree: Any) -> list[str]:
  """Path of every leaf (encodings are leaves), without linen's `params/` prefix."""
  prefix = "params/" if params_of(tree) is not tree else ""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_encoding)[0]
  return [path_string(kp).removeprefix(prefix) for kp, _ in flat]


def quantized_apply(apply_fn: Callable[..., Any], *, strict: bool = False) -> Callable[..., Any]:
  """`apply(ctree, *args)` running `apply_fn` with every W8A8 `QArray` on the integer path.

  Leaves that are other encodings (or weight-only QArrays) are materialized inside `jit`. A
  W8A8 kernel the integer path cannot take (batched or reshaped kernels, one used through a
  transpose or other layout op, grouped/depthwise convs, fp8 codes) still gets its
  activations quantized as the integer path would (`fake_quant_activation`) and multiplied in
  float by the dequantized kernel, with an `IntegerPathWarning` naming the leaf and why; a
  kernel whose value passes through an op the replay does not follow (e.g. `mul`) is named
  too, as that use runs in float with float activations.

  Control flow is followed: layers stacked by `nn.scan` / `nnx.scan` run each layer's slice
  of a stacked `QArray` (`layers` set, per-layer scales) on the integer path, and kernels
  inside `cond` branches or `while` bodies are substituted there too.

  Args:
    apply_fn: `(params, *args) -> outputs`, linen, nnx or pure.
    strict: raise `IntegerPathError` (at trace time) instead of warning.

  Raises:
    IntegerPathError: with `strict=True`, naming each such leaf, the reason and the fix.
  """

  def apply(ctree, *args):
    leaves, treedef = jax.tree.flatten(ctree, is_leaf=is_encoding)
    names = leaf_paths(ctree)
    qs = {names[i]: leaf for i, leaf in enumerate(leaves) if isinstance(leaf, QArray)}
    w8a8 = {p for p, q in qs.items() if q.act_bits is not None}
    dense = [leaf.materialize() if is_encoding(leaf) else leaf for leaf in leaves]
    params = jax.tree.unflatten(treedef, dense)
    off_path: dict[str, list[str]] = {}  # path -> reasons, in the order they were met

    def note(path, reason, quantized):
      # A fallback quantizes activations; an op the replay does not follow cannot.
      effect = "runs in float on fake-quantized activations" if quantized else (
        "that use runs in float with float activations")  # fmt: skip
      reasons = off_path.setdefault(path, [])
      if f"{reason}: {effect}" not in reasons:
        reasons.append(f"{reason}: {effect}")

    def substitute(eqn, invals, in_src):
      name = eqn.primitive.name
      if name == "gather" and isinstance(in_src[0], str) and in_src[0] in qs:
        return lookup_rows(eqn.params, invals, qs[in_src[0]])
      if name not in _OP:
        for i, src in enumerate(in_src):
          if _source(src) in w8a8 and not (i == 0 and name in _NOT_MATMUL_INPUT):
            note(_source(src), f"it passes through `{name}`, which is not followed", False)
        return None
      w_index = 1 if _source(in_src[1]) in qs else 0 if _source(in_src[0]) in qs else None
      if w_index is None:
        return None
      src = in_src[w_index]
      q, unstacked = _layer_of(qs[_source(src)], src)
      if name == "conv_general_dilated" and w_index == 0:
        return None  # a kernel as the conv's input: nothing to substitute
      if unstacked is not None:
        out, why = None, unstacked
      elif isinstance(src, Derived):
        out, why = None, f"it reaches its {_OP[name]} through `{src.op}`"
      elif name == "dot_general":
        out, why = _dot(eqn.params, invals, w_index, q)
      elif q.act_bits is None:
        return None  # weight-only conv: the materialized kernel is exact
      else:
        why = _conv_refusal(q, eqn.params, invals[1])
        out = _conv(eqn.params, invals, q) if why is None else None
      if q.act_bits is None or why is None:
        return None if out is None else [out]
      note(_source(src), why, True)
      if out is not None:  # fp8 dot: the integer path's numerics, emulated in float
        return [out]
      x_index = 1 - w_index
      if name == "dot_general":
        (lc, rc), _ = eqn.params["dimension_numbers"]
        axes = tuple(rc if x_index == 1 else lc)
      else:
        batch_axis = eqn.params["dimension_numbers"][0][0]
        axes = tuple(d for d in range(invals[0].ndim) if d != batch_axis)
      invals = list(invals)
      invals[x_index] = fake_quant_activation(invals[x_index], q, axes)
      out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      return [out]

    index = {i: path for i, path in enumerate(names) if path in qs}
    unfollowed: dict[str, str] = {}
    out = replay_with(
      apply_fn, params, args, index, substitute, layout_ops=LAYOUT_OPS, unfollowed=unfollowed
    )
    for path, op in unfollowed.items():
      if op in CONTROL_FLOW and path in w8a8:  # e.g. a layer of a layer, or a loop's carry
        note(path, f"it enters `{op}` in a way the replay does not follow", False)
    _report(off_path, qs, strict)
    return out

  return apply


_OP = {"dot_general": "matmul", "conv_general_dilated": "conv"}
# Ops whose first operand may be a W8A8 leaf without a float matmul on it: the followed ones,
# and `gather` (an embedding lookup has no activations to quantize).
_NOT_MATMUL_INPUT = FOLLOWED_OPS | {"gather"}


def _source(src) -> str | None:
  return src.path if isinstance(src, Derived) else src


def _layer_of(q: QArray, src) -> tuple[QArray, str | None]:
  """The QArray for the kernel `src` names: layer `i` of a stacked one inside a `scan`.

  Returns `(q, None)`, or `(q, why)` when a layer slice meets a QArray with no layer axis
  (quantized across the layers, so no layer of its codes is a kernel of its own), or a
  stacked QArray is consumed whole.
  """
  inner = src.path if isinstance(src, Derived) else src
  if not isinstance(inner, LayerSlice):
    if q.layers is None:
      return q, None
    # No single layer's static activation scale applies: a fallback uses dynamic ones.
    return dataclasses.replace(q, act_scale=None), (
      f"it is a stack of {q.layers} layers used whole, not one layer at a time inside `scan`"
    )
  if q.layers == inner.layers:
    return q[inner.index], None
  return q, (
    f"it is used one layer at a time inside `scan`, but was quantized as one {q.shape} kernel "
    "without a layer axis (quantize it with its capture site, `contract_dims=jaxshrink.capture."
    "find_sites(...)`, or through `ptq`/`gptq`/`awq`, for per-layer scales)"
  )


def _report(off_path: dict[str, list[str]], qs: dict[str, QArray], strict: bool) -> None:
  lines = [f"`{path}` (int{qs[path].act_bits} activations): {'; '.join(why)}"
           for path, why in off_path.items()]  # fmt: skip
  if lines and strict:
    raise IntegerPathError(
      f"W8A8 kernels off the integer path: {' | '.join(lines)}. {_FIX}; or call "
      "`quantized_apply` without `strict=True` to accept the float fallback."
    )
  for line in lines:
    warnings.warn(
      f"{line}. {_FIX}; `quantized_apply(..., strict=True)` makes this an error.",
      IntegerPathWarning,
      stacklevel=3,
    )
