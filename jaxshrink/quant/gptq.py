"""GPTQ: post-training quantization that corrects rounding error with second-order information.

Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (ICLR 2023, arXiv:2210.17323).

For a kernel in its `(K, N)` matrix view `W` and the layer Hessian `H = 2/n XᵀX` of its
calibration inputs, GPTQ quantizes the rows of `W` (input channels) one at a time and spreads
each row's rounding error over the rows not yet quantized, weighted by the upper Cholesky
factor `U` of `H⁻¹`. That minimizes `||XW - XŴ||²` far better than rounding each weight.

Implementation notes (what this module does, and why):

- Rows are processed in blocks of `block_size` under one `jit`: a `lax.fori_loop` over the
  rows of a block with lazy updates inside the block, then one matmul pushes the block's error
  onto all later rows. float32 throughout.
- Groups without act-order are *dynamic*, as in the paper: a group's scales come from its rows
  after the earlier groups' errors were folded in (blocks are aligned to whole groups).
- act-order (`act_order=True`) visits rows by decreasing Hessian diagonal. With groups it uses
  *static* groups: scales are computed from the original weights before the permutation, so
  each group stays a contiguous run of `K` and the result is an ordinary `QArray` (no per-row
  group index). Per-channel act-order needs nothing special.
- Inputs never active in calibration ("dead", zero Hessian diagonal) keep their weights and
  are rounded to nearest; the error of other rows never reaches them.
- All selected layers are quantized from the float model's activations (one calibration pass,
  memory `K × K` per layer), not sequentially through already-quantized layers.
- `overrides` give layers their own spec, or keep them float (None), as in
  `jaxshrink.quant.ptq.quantize_params`; only the layers that end up quantized are calibrated.
- Pruned weights stay pruned: an exact zero (a trained dense kernel has none) gets the code of
  0.0, and its current value, moved by earlier rows' updates, is compensated as a rounding
  error, as SparseGPT does for its masks. So pruning then GPTQ keeps the mask and its sparsity.
- A kernel stacked on a leading layer axis (`nn.scan` / `nnx.scan`) is quantized layer by
  layer, each with its own Hessian and scales, into one stacked `QArray` (`layers=L`).

>>> tree = gptq(model.apply, params, batches, Rule(".*kernel", min_ndim=2), QuantSpec(bits=4))
>>> tree["block_0"]["mlp"]["fc1"]["kernel"].codes.dtype      # packed int4
dtype('uint8')
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxshrink import sequential
from jaxshrink.capture import kernel_matrix
from jaxshrink.errors import InvalidTypeError, InvalidValueError
from jaxshrink.hessian import collect_hessians, damped_inverse_cholesky
from jaxshrink.model import accepts_models
from jaxshrink.quant import numerics
from jaxshrink.quant.ptq import LayerQuant, Overrides, resolve_layers
from jaxshrink.quant.qarray import QArray, normalize_contract_dims, stack
from jaxshrink.quant.spec import QuantSpec
from jaxshrink.sparsity.structures import keep_top, nm_mask
from jaxshrink.tree import Rule, map_with_path, paths_rule


def check_spec(spec: QuantSpec, method: str, path: str = "<array>") -> QuantSpec:
  """Validates a spec for GPTQ/AWQ (integer formats only) and returns it with nearest rounding."""
  if not isinstance(spec, QuantSpec):
    raise InvalidTypeError(
      f"`spec` must be a jaxshrink.quant.QuantSpec; got {type(spec).__name__}. Build one with "
      "QuantSpec(bits=4, group_size=128)."
    )
  spec.validate(path)
  if spec.format != "int":
    raise InvalidValueError(
      f"{method} produces integer codes; got format {spec.format!r} for `{path}`. Use "
      "format 'int', or method 'rtn' for fp8."
    )
  return dataclasses.replace(spec, rounding="nearest")


def layer_specs(
  params: Any, rule: Rule | str, spec: QuantSpec, overrides: Overrides, method: str
) -> dict[str, QuantSpec]:
  """`{path: spec}` of the kernels a weight-only method quantizes.

  `rule` selects kernels for `spec`; `overrides` (`[(rule, QuantSpec | None)]`, first match wins)
  give some their own spec or keep them float (None), as in `quantize_params`.

  Raises:
    NoMatchError: the rule or an override's rule matches nothing.
    ValueError: a spec the method cannot produce, or an override asking for activation bits.
  """
  base = check_spec(spec, method)
  layers = resolve_layers(params, rule, LayerQuant(base), overrides)
  specs = {}
  for path, layer in layers.items():
    if layer.activation_bits is not None:
      raise InvalidValueError(
        f"{method} quantizes weights only; the override for `{path}` asks for "
        f"activation_bits={layer.activation_bits}. Pass a QuantSpec (or None) in `overrides`; "
        "the `quantize` recipe stage adds W8A8 activations on top of it."
      )
    specs[path] = check_spec(layer.spec, method, path)
  return specs


def _row_spec(spec: QuantSpec) -> QuantSpec:
  """The spec applied to single rows whose scales were already chosen: one group, broadcast."""
  return dataclasses.replace(spec, group_size=None, per_tensor=False)


class SweepPruning(NamedTuple):
  """Pruning decided inside the GPTQ row sweep (SparseGPT's joint prune + quantize pass).

  Unstructured (`m == 0`): at the start of each lazy-update block the `round(sparsity · rows ·
  N)` weights of the block with the lowest `w² / U_jj²` are pruned. N:M: every M rows, the
  `M - N` lowest of each column's next M weights, from the weights as they are then (earlier
  errors folded in). The same choices as `jaxshrink.sparsity.sparsegpt` without quantization.
  """

  sparsity: float  # fraction pruned per block (unstructured; ignored for N:M)
  n: int  # N of N:M; 0 for unstructured
  m: int  # M of N:M; 0 for unstructured


def _gptq_rows(
  w, keep, u, table, zp_table, row_group, drops, *, spec, block, group, dynamic, nm, rows_real
):
  """GPTQ over the rows of `w (Kp, N)` (working order, `Kp` a multiple of `block`).

  Args:
    w: weights in working order, float32.
    keep: `(Kp, N)` bool, False where a weight was pruned: it gets the code of 0.0 and its
      current (updated) value is compensated like any rounding error, so the mask survives.
    u: `(Kp, Kp)` upper Cholesky factor of the damped inverse Hessian in the same order.
    table: `(G, N)` float32 scales per group (filled in here when `dynamic`).
    zp_table: `(G, N)` int32 zero points, or None (symmetric).
    row_group: `(Kp,)` int32: which `table` row quantizes each working row.
    spec: the quantization spec; block: rows per block; group: rows per dynamic group.
    dynamic: compute each group's scales from its current rows when the group starts.
    drops: None, or int32 `(Kp / block,)`: how many weights of each block to prune (unstructured
      pruning during the sweep, `SweepPruning`).
    nm: None, or `(n, m)`: prune N:M during the sweep.
    rows_real: the real rows `K`; the rest is padding, never pruned.

  Returns:
    int32 codes `(Kp, N)` in working order, the final scale table and zero-point table, and
    the final keep mask.
  """
  kp, n = w.shape
  row_spec = _row_spec(spec)
  rows = jnp.arange(block)

  def row_step(start, ub, j, carry):
    wb, kb, codes, err, table, zp_table = carry
    g = row_group[start + j]
    if nm is not None:

      def choose(kb):
        cur = lax.dynamic_slice(wb, (j, 0), (nm[1], n))
        diag = lax.dynamic_slice(jnp.diag(ub), (j,), (nm[1],))
        chosen = nm_mask((cur / diag[:, None]) ** 2, nm[0], nm[1], axis=0)
        return lax.dynamic_update_slice(kb, chosen, (j, 0))

      kb = lax.cond(j % nm[1] == 0, choose, lambda kb: kb, kb)
    if dynamic:

      def refresh(tables):
        t, z = tables
        cur = lax.dynamic_slice(jnp.where(kb, wb, 0.0), (j, 0), (group, n))
        s, zp = numerics.compute_qparams(cur, spec)
        t = lax.dynamic_update_slice(t, s.astype(jnp.float32), (g, 0))
        z = None if z is None else lax.dynamic_update_slice(z, zp, (g, 0))
        return t, z

      table, zp_table = lax.cond(j % group == 0, refresh, lambda t: t, (table, zp_table))
    scale = lax.dynamic_slice(table, (g, 0), (1, n))
    zp = None if zp_table is None else lax.dynamic_slice(zp_table, (g, 0), (1, n))
    row = wb[j][None]
    c = numerics.quantize_codes(row, scale, zp, row_spec)
    zero = numerics.quantize_codes(jnp.zeros_like(row), scale, zp, row_spec)
    c = jnp.where(kb[j][None], c, zero)
    q = numerics.dequantize_codes(c, scale, zp, row_spec)
    e = (row - q)[0] / ub[j, j]
    # Lazy update: only the later rows of this block now; the rest after the block.
    wb = wb - jnp.where((rows > j)[:, None], ub[j][:, None] * e[None, :], 0.0)
    return wb, kb, codes.at[j].set(c[0]), err.at[j].set(e), table, zp_table

  def block_step(b, carry):
    w, keep, codes_all, table, zp_table = carry
    start = b * block
    wb = lax.dynamic_slice(w, (start, 0), (block, n))
    kb = lax.dynamic_slice(keep, (start, 0), (block, n))
    ub = lax.dynamic_slice(u, (start, start), (block, block))
    if drops is not None:
      score = (wb / jnp.diag(ub)[:, None]) ** 2
      real = (start + rows < rows_real)[:, None]
      kb = kb & ~keep_top(jnp.where(real, -score, -jnp.inf), drops[b])  # drop the lowest
    init = (
      wb,
      kb,
      jnp.zeros((block, n), jnp.int32),
      jnp.zeros((block, n), jnp.float32),
      table,
      zp_table,
    )
    _, kb, codes, err, table, zp_table = lax.fori_loop(
      0, block, functools.partial(row_step, start, ub), init
    )
    urows = lax.dynamic_slice(u, (start, 0), (block, kp))
    later = (jnp.arange(kp) >= start + block)[:, None]
    w = w - jnp.where(later, urows.T @ err, 0.0)
    codes_all = lax.dynamic_update_slice(codes_all, codes, (start, 0))
    keep = lax.dynamic_update_slice(keep, kb, (start, 0))
    return w, keep, codes_all, table, zp_table

  init = (w, keep, jnp.zeros((kp, n), jnp.int32), table, zp_table)
  _, keep, codes, table, zp_table = lax.fori_loop(0, kp // block, block_step, init)
  return codes, table, zp_table, keep


@functools.partial(
  jax.jit, static_argnames=("spec", "block", "group", "dynamic", "nm", "padded", "groups")
)
def _sweep(w, u, scale, zp, row_group, order, drops, *, spec, block, group, dynamic, nm, padded,
           groups):  # fmt: skip
  """`_gptq_rows` on `w (K, N)` visited in `order`: pads to `padded` rows, returns the codes
  and keep mask in the original order and the `groups` rows of the scale tables. One compiled
  call per shape (the persistent cache keeps it), not a dozen small eager ones."""
  k, n = w.shape
  w = w[order]
  # Padding rows are zero weights with an identity Hessian block: they never touch real rows.
  w_work = jnp.pad(w, ((0, padded - k), (0, 0)))
  u_work = jnp.eye(padded, dtype=jnp.float32).at[:k, :k].set(u)
  if drops is None and nm is None:
    # Exact zeros are pruned weights (a trained dense matrix has none): they stay zero.
    keep = jnp.pad(w != 0, ((0, padded - k), (0, 0)), constant_values=True)
  else:  # the sweep chooses the mask
    keep = jnp.ones((padded, n), bool)
  if dynamic:
    table = jnp.zeros((padded // group, n), jnp.float32)
    zp_table = None if spec.symmetric else jnp.zeros((padded // group, n), jnp.int32)
  else:
    table = jnp.broadcast_to(scale.astype(jnp.float32), (scale.shape[0], n))
    zp_table = zp
  codes, table, zp_table, keep = _gptq_rows(
    w_work, keep, u_work, table, zp_table, row_group, drops, spec=spec, block=block,
    group=group, dynamic=dynamic, nm=nm, rows_real=k,
  )  # fmt: skip
  back = jnp.argsort(order)
  zp_table = None if zp_table is None else zp_table[:groups]
  return codes[:k][back], table[:groups], zp_table, keep[:k][back]


def gptq_sweep(
  w2d: jax.Array,
  u: jax.Array,
  spec: QuantSpec,
  *,
  block_size: int = 128,
  perm: np.ndarray | None = None,
  prune: SweepPruning | None = None,
  qparams: tuple[jax.Array, jax.Array | None] | None = None,
  path: str = "<array>",
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array]:
  """The GPTQ row sweep on one `(K, N)` matrix, shared by GPTQ and SparseGPT's joint pass.

  Args:
    w2d: float32 `(K, N)` weights in their original row order. Exact zeros are pruned weights
      and stay zero.
    u: `(K, K)` upper Cholesky factor of the damped inverse Hessian, in visiting order.
    spec: a checked integer spec (`check_spec`).
    block_size: rows per lazy-update block (rounded to whole groups).
    perm: visiting order of the rows (act-order), or None for `0..K-1`. With groups it makes
      them static: scales from the original weights, each row in its original group.
    prune: weights to prune during the sweep (`SweepPruning`), or None; rows are visited in
      order. Groups are then static (a group's mask is not known when it starts): scales are
      fixed before the sweep, from `qparams` or from `w2d`.
    qparams: `(scale, zero_point)` of `numerics.compute_qparams` to use instead of `w2d`'s
      (static groups or per-channel only), e.g. from the weights a prune-only pass leaves.
    path: leaf path named in warnings and errors.

  Returns:
    `(codes, scale, zero_point, keep)`: int32 `(K, N)` codes, `(G, N)` scales, `(G, N)` zero
    points (None when symmetric) and the bool `(K, N)` keep mask, all in the original order.
  """
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise InvalidValueError(
      f"`block_size` must be a positive int; got {block_size!r}. 128 is typical."
    )
  w = jnp.asarray(w2d, jnp.float32)
  k, n = w.shape
  group = numerics.effective_group_size(spec, k, path)
  dynamic = group is not None and perm is None and prune is None
  if prune is not None and perm is not None:
    raise InvalidValueError("Pruning during the sweep visits rows in order; pass `perm=None`.")
  if qparams is not None and dynamic:
    raise InvalidValueError("`qparams` fixes the scales before the sweep: not with dynamic groups.")
  order = np.arange(k) if perm is None else np.asarray(perm)
  scale = zp = None
  if dynamic:
    block = group * max(1, block_size // group)
    kp = math.ceil(k / block) * block
    row_group = np.arange(kp) // group
  else:
    block = min(block_size, k)
    kp = math.ceil(k / block) * block
    scale, zp = numerics.compute_qparams(w, spec, path=path) if qparams is None else qparams
    # Static groups: a row keeps the group of its original position.
    row_group = np.zeros(kp, np.int64)
    if group is not None:
      row_group[:k] = order // group
  nm = drops = None
  if prune is not None and prune.m:
    if block % prune.m:
      raise InvalidValueError(f"`block_size` ({block_size}) must be a multiple of M={prune.m}.")
    nm = (int(prune.n), int(prune.m))
  elif prune is not None:
    # Pruned per block, from its real rows (Python's round, as the plain SparseGPT sweep).
    starts = range(0, kp, block)
    drops = np.asarray([round(prune.sparsity * min(block, k - s) * n) for s in starts], np.int32)
  codes, table, zp_table, keep = _sweep(
    w, u, scale, zp, row_group.astype(np.int32), order.astype(np.int32), drops, spec=spec,
    block=block, group=group or 1, dynamic=dynamic, nm=nm, padded=kp,
    groups=numerics.num_groups(k, group) if dynamic else 1,
  )  # fmt: skip
  if dynamic:
    return codes, table, zp_table, keep
  return codes, scale, zp, keep


def gptq_matrix(
  w2d: jax.Array,
  h: jax.Array,
  spec: QuantSpec,
  *,
  damp: float = 0.01,
  act_order: bool = False,
  block_size: int = 128,
  path: str = "<array>",
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """GPTQ on one `(K, N)` matrix given its `(K, K)` Hessian.

  The row sweep is sequential over `K`; output columns are independent, so a matrix split on
  `N` over a mesh stays split. The `K x K` inverse-Hessian factor is built on the host.

  Args:
    w2d: float `(K, N)` weights (rows = input channels).
    h: `(K, K)` Hessian of the layer inputs (`jaxshrink.hessian.hessian_from_gram`).
    spec: bits, symmetry and granularity (integer format).
    damp: relative diagonal damping of `h`.
    act_order: visit rows by decreasing `diag(h)` (static groups, see the module docstring).
    block_size: rows per lazy-update block (rounded to whole groups).
    path: leaf path named in warnings and errors.

  Returns:
    `(codes, scale, zero_point)` ready for `QArray.from_codes`: int32 `(K, N)` codes,
    `(G, N)` scales and `(G, N)` zero points (None when symmetric).

  >>> codes, scale, zp = gptq_matrix(w, 2 * x.T @ x / len(x), QuantSpec(bits=4))
  """
  spec = check_spec(spec, "GPTQ", path)
  numerics.check_float_matrix(w2d, path)
  k, n = w2d.shape
  if h.shape != (k, k):
    raise InvalidValueError(
      f"The Hessian of `{path}` has shape {tuple(h.shape)} but its matrix view is {(k, n)}; "
      f"expected ({k}, {k}). Build it from the inputs of this kernel (collect_hessians)."
    )
  perm = None
  if act_order:
    perm = np.argsort(-np.asarray(jnp.diag(h)), kind="stable")
  h = jnp.asarray(h) if perm is None else jnp.asarray(h)[perm][:, perm]
  u = damped_inverse_cholesky(h, damp=damp, path=path)
  codes, scale, zp, _ = gptq_sweep(w2d, u, spec, block_size=block_size, perm=perm, path=path)
  return codes, scale, zp


def gptq_kernel(
  kernel: jax.Array,
  h: jax.Array,
  spec: QuantSpec,
  *,
  contract_dims=(0,),
  damp: float = 0.01,
  act_order: bool = False,
  block_size: int = 128,
  path: str = "<array>",
) -> QArray:
  """GPTQ on one kernel of any rank; returns its `QArray`.

  Args:
    kernel: float array, e.g. Dense `(in, out)` or conv `(kh, kw, cin, cout)`.
    h: `(K, K)` Hessian in `kernel_matrix(kernel, contract_dims)` row order.
    spec, damp, act_order, block_size, path: as in `gptq_matrix`.
    contract_dims: the kernel's input axes (`capture.Site.contract_dims`).

  >>> q = gptq_kernel(w, h, QuantSpec(bits=4, group_size=32), path="fc1/kernel")
  """
  dims = normalize_contract_dims(contract_dims, jnp.ndim(kernel), path)
  codes, scale, zp = gptq_matrix(
    kernel_matrix(kernel, dims),
    h,
    spec,
    damp=damp,
    act_order=act_order,
    block_size=block_size,
    path=path,
  )
  return QArray.from_codes(
    codes, scale, zp, spec, shape=kernel.shape, dtype=kernel.dtype, contract_dims=dims
  )


@accepts_models
def gptq(
  apply_fn: Callable[[Any, Any], Any],
  params: Any,
  batches: Iterable[Any],
  rule: Rule | str,
  spec: QuantSpec,
  *,
  damp: float = 0.01,
  act_order: bool = False,
  block_size: int = 128,
  overrides: Overrides = (),
  reference: Any = None,
) -> Any:
  """GPTQ-quantizes the kernels selected by `rule`, from calibration batches.

  Args:
    apply_fn: `(params, x) -> outputs` (a zoo model's `apply`, a linen/nnx apply).
    params: float param tree.
    batches: iterable of model inputs, streamed once (memory: one `K × K` Hessian per layer).
    rule: the kernels to quantize (each must feed a matmul or conv).
    spec: bits, symmetry and granularity (integer format).
    damp: relative Hessian damping; retried 10x larger when a Cholesky fails.
    act_order: visit input channels by decreasing activation energy.
    block_size: rows per lazy-update block.
    overrides: `[(rule, QuantSpec | None)]`: per-layer specs; None keeps a layer float. The
      first rule matching a leaf wins.
    reference: the float tree, when `params` is a model already partly compressed (sequential
      calibration): each kernel is moved toward the float model's outputs before it is
      quantized (`jaxshrink.sequential.fitted`). None fits it to its own outputs on `params`.

  Returns:
    The tree with `QArray` leaves for the selected kernels, other leaves unchanged.

  Raises:
    JaxshrinkError: empty calibration set, NaN/Inf in a batch, a rule matching nothing, or a
      Hessian that stays singular. ValueError: unsupported bits or format, NaN weights.

  >>> tree = gptq(model.apply, params, batches, Rule(".*kernel"), QuantSpec(bits=4, group_size=32),
  ...             overrides=[("head/kernel", QuantSpec(bits=8)), ("embed/.*", None)])
  """
  specs = layer_specs(params, rule, spec, overrides, "GPTQ")
  if not specs:  # every selected layer was kept float
    return params
  targets = {}
  if reference is None:
    hessians = collect_hessians(apply_fn, params, batches, paths_rule(specs))
  else:
    found = sequential.fitted(apply_fn, reference, params, batches, list(specs), damp=damp)
    hessians = {path: (h, site) for path, (_, h, site) in found.items()}
    targets = {path: kernel for path, (kernel, _, _) in found.items()}

  def quantize_leaf(path: str, kernel: Any) -> Any:
    if path not in specs:
      return kernel
    kernel = targets.get(path, kernel)
    h, site = hessians[path]
    # A stacked kernel (layers of a scan): each layer is its own kernel, with its own Hessian.
    per_layer = [
      gptq_kernel(
        w, h_i, specs[path], contract_dims=site.contract_dims, damp=damp, act_order=act_order,
        block_size=block_size, path=path if site.layers is None else f"{path}[{i}]",
      )
      for i, (w, h_i) in enumerate(zip(site.per_layer(kernel), site.per_layer(h), strict=True))
    ]  # fmt: skip
    return per_layer[0] if site.layers is None else stack(per_layer)

  return map_with_path(quantize_leaf, params)
