"""AWQ: activation-aware weight quantization by a per-input-channel scale search.

Lin, Tang, Tang, Yang, Dang, Gan & Han, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration" (MLSys 2024, arXiv:2306.00978).

Weights that meet large activations matter most. AWQ scales input channel `i` of a kernel
`W (K, N)` up by `s_i` before quantizing, so its weights get relatively finer steps, and divides
the activation by `s_i` (here: the stored `QArray.input_scale`, so the logical weight is
`dequant(Q(W · s)) / s` and no other layer changes). The scales are `s = mean|x|^α`
(normalized to geometric mean 1 of their extremes), with `α` chosen on a grid to minimize the
layer's output error on calibration data, `||XW - X Ŵ(α)||²`, computed exactly from the Gram
matrix `XᵀX` streamed by `jaxshrink.capture`. `α = 0` is plain round-to-nearest, so the search
never does worse than RTN on that objective.

Differences from the paper: each kernel searches its own scales (q, k and v do not share one,
since nothing is folded into the previous LayerNorm), and the loss is the layer's own output,
not the whole attention block's. The paper's second step, a search of a clipping ratio per
output channel (and group) against the same objective, follows the scale search (`clip=True`).

>>> tree = awq(model.apply, params, batches, Rule(".*kernel", min_ndim=2), QuantSpec(bits=4))
>>> tree["head"]["kernel"].input_scale.shape                # (K,)
(192,)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxshrink import capture, sequential
from jaxshrink.capture import kernel_matrix
from jaxshrink.errors import InvalidValueError
from jaxshrink.model import accepts_models
from jaxshrink.quant import numerics
from jaxshrink.quant.gptq import check_spec, layer_specs
from jaxshrink.quant.ptq import Overrides
from jaxshrink.quant.qarray import QArray, normalize_contract_dims, stack
from jaxshrink.quant.spec import QuantSpec
from jaxshrink.tree import Rule, map_with_path, paths_rule

# Floor on the per-channel activation magnitude, so channels that were never active
# do not produce zero or infinite scales.
_MIN_MAGNITUDE = 1e-4


def abs_mean_reducer() -> capture.Reducer:
  """Per input channel sum of |x| and the row count; their ratio is AWQ's mean |x|."""
  return capture.Reducer(
    init=lambda k: (jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.float32)),
    update=lambda s, x, w: (s[0] + jnp.sum(jnp.abs(x) * w[:, None], axis=0), s[1] + jnp.sum(w)),
  )


def awq_scales(magnitude: jax.Array, alpha: jax.Array) -> jax.Array:
  """`s = magnitude^α`, normalized so `sqrt(max(s) · min(s)) = 1`; shape `(K,)` float32."""
  s = jnp.maximum(magnitude.astype(jnp.float32), _MIN_MAGNITUDE) ** alpha
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def _quantize_scaled(w, s, spec):
  """Codes, qparams and the logical matrix `dequant(Q(W · s)) / s`."""
  scaled = w * s[:, None]
  scale, zp = numerics.compute_qparams(scaled, spec)
  codes = numerics.quantize_codes(scaled, scale, zp, spec)
  return codes, scale, zp, numerics.dequantize_codes(codes, scale, zp, spec) / s[:, None]


@functools.partial(jax.jit, static_argnames=("spec", "grid"))
def _search(w, gram, magnitude, *, spec, grid):
  """Output error `tr(ΔWᵀ XᵀX ΔW)` for each `α = i / grid`, `i < grid`; shape `(grid,)`."""

  def loss(alpha):
    _, _, _, wq = _quantize_scaled(w, awq_scales(magnitude, alpha), spec)
    delta = w - wq
    return jnp.sum(delta * (gram @ delta))

  # lax.map, not vmap: one candidate's (K, N) temporaries alive at a time.
  return jax.lax.map(loss, jnp.arange(grid, dtype=jnp.float32) / grid)


# Clipping ratios tried per output channel and group (AWQ's max shrink 0.5).
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(10))


@functools.partial(jax.jit, static_argnames=("spec", "ratios"))
def _clip_search(w, gram, *, spec, ratios):
  """Per (group, column) clipping of `w`'s range minimizing that group's output error.

  Returns `w` clipped to `ratio · [min, max]` of each group and column, with the ratio that
  minimizes `δᵀ G_gg δ` (the group's diagonal Gram block), so `compute_qparams` of it gives the
  clipped scales.
  """
  k, n = w.shape
  group = spec.group_size if spec.grouped and spec.group_size <= k else k
  g = -(-k // group)
  kp = g * group
  wg = jnp.pad(w, ((0, kp - k), (0, 0))).reshape(g, group, n)
  padded = jnp.pad(gram, ((0, kp - k), (0, kp - k))).reshape(g, group, g, group)
  blocks = jnp.moveaxis(jnp.diagonal(padded, axis1=0, axis2=2), -1, 0)  # (g, group, group)
  hi, lo = jnp.max(wg, axis=1), jnp.min(wg, axis=1)
  if spec.symmetric:
    hi = jnp.maximum(hi, -lo)
    lo = -hi

  def clipped(r):  # r: scalar or (g, n)
    return jnp.clip(wg, (r * lo)[:, None], (r * hi)[:, None]).reshape(kp, n)[:k]

  def loss(r):
    scale, zp = numerics.compute_qparams(clipped(jnp.full((g, n), r)), spec)
    deq = numerics.dequantize_codes(numerics.quantize_codes(w, scale, zp, spec), scale, zp, spec)
    d = jnp.pad(w - deq, ((0, kp - k), (0, 0))).reshape(g, group, n)
    return jnp.einsum("gin,gij,gjn->gn", d, blocks, d)

  ratios = jnp.asarray(ratios, jnp.float32)
  best = ratios[jnp.argmin(jax.lax.map(loss, ratios), axis=0)]  # (g, n)
  return clipped(best)


def awq_matrix(
  w2d: jax.Array,
  gram: jax.Array,
  magnitude: jax.Array,
  spec: QuantSpec,
  *,
  grid: int = 20,
  clip: bool = True,
  path: str = "<array>",
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array, float]:
  """AWQ on one `(K, N)` matrix.

  Args:
    w2d: float `(K, N)` weights.
    gram: `(K, K)` `XᵀX` of the calibration inputs (any positive multiple works).
    magnitude: `(K,)` mean |x| per input channel.
    spec: bits, symmetry and granularity (integer format).
    grid: number of `α` values tried, `0, 1/grid, ..., (grid-1)/grid`.
    clip: after the scale search, also search a clipping ratio in `[0.55, 1]` of each
      group's range per output channel (AWQ's second step); per-tensor specs never clip.
    path: leaf path named in errors.

  Returns:
    `(codes, scale, zero_point, input_scale, alpha)`: int32 `(K, N)` codes of `W · s`, their
    `(G, N)` qparams, `s` `(K,)` float32 and the chosen `α`.

  >>> codes, scale, zp, s, alpha = awq_matrix(w, x.T @ x, jnp.abs(x).mean(0), QuantSpec(bits=4))
  """
  spec = check_spec(spec, "AWQ", path)
  numerics.check_float_matrix(w2d, path)
  if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
    raise InvalidValueError(f"`grid` must be a positive int; got {grid!r}. 20 is typical.")
  w = jnp.asarray(w2d, jnp.float32)
  k = w.shape[0]
  if gram.shape != (k, k) or magnitude.shape != (k,):
    raise InvalidValueError(
      f"Calibration statistics of `{path}` do not fit its ({k}, {w.shape[1]}) matrix view: gram "
      f"{tuple(gram.shape)}, magnitude {tuple(magnitude.shape)}; expected ({k}, {k}) and ({k},)."
    )
  # Evaluate the fallback warning (group > K) once here, not inside the traced search.
  numerics.effective_group_size(spec, k, path)
  losses = _search(w, jnp.asarray(gram, jnp.float32), magnitude, spec=spec, grid=grid)
  alpha = float(jnp.argmin(losses)) / grid
  s = awq_scales(magnitude, jnp.float32(alpha))
  if not clip or spec.per_tensor:
    codes, scale, zp, _ = _quantize_scaled(w, s, spec)
    return codes, scale, zp, s, alpha
  # The scaled layer computes (x / s) @ (W · s): its Gram is XᵀX / (s sᵀ).
  scaled = w * s[:, None]
  gram_scaled = jnp.asarray(gram, jnp.float32) / (s[:, None] * s[None, :])
  scale, zp = numerics.compute_qparams(
    _clip_search(scaled, gram_scaled, spec=spec, ratios=CLIP_RATIOS), spec
  )
  return numerics.quantize_codes(scaled, scale, zp, spec), scale, zp, s, alpha


@accepts_models
def awq(
  apply_fn: Callable[[Any, Any], Any],
  params: Any,
  batches: Iterable[Any],
  rule: Rule | str,
  spec: QuantSpec,
  *,
  grid: int = 20,
  clip: bool = True,
  overrides: Overrides = (),
  reference: Any = None,
) -> Any:
  """AWQ-quantizes the kernels selected by `rule`, from calibration batches.

  Args:
    apply_fn: `(params, x) -> outputs`.
    params: float param tree.
    batches: iterable of model inputs, streamed once (memory: `K × K` per layer).
    rule: the kernels to quantize.
    spec: bits, symmetry and granularity (integer format), weight-only.
    grid: number of `α` values searched per kernel.
    clip: also search a per-channel clipping ratio (see `awq_matrix`).
    overrides: `[(rule, QuantSpec | None)]`: per-layer specs; None keeps a layer float. The
      first rule matching a leaf wins.
    reference: the float tree, when `params` is a model already partly compressed (sequential
      calibration): each kernel is moved toward the float model's outputs before its scales
      are searched (`jaxshrink.sequential.fitted`). None searches them for its own outputs.

  Returns:
    The tree with `QArray` leaves (`input_scale` set) for the selected kernels; a kernel
    stacked by `nn.scan` / `nnx.scan` gets one stacked `QArray`, each layer with its own
    search, scales and `input_scale`.

  Raises:
    JaxshrinkError: empty calibration set, NaN/Inf in a batch, a rule matching nothing.
    ValueError: unsupported bits or format, NaN weights, a bad `grid`.

  >>> tree = awq(model.apply, params, batches, Rule(".*kernel", min_ndim=2), QuantSpec(bits=4))
  """
  # A rule that matches nothing raises NoMatchError listing the paths.
  specs = layer_specs(params, rule, spec, overrides, "AWQ")
  if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
    raise InvalidValueError(f"`grid` must be a positive int; got {grid!r}. 20 is typical.")
  if not specs:  # every selected layer was kept float
    return params
  reducers = {"gram": capture.gram_reducer(), "abs": abs_mean_reducer()}
  batches = list(batches)
  collected = capture.collect(apply_fn, params, batches, paths_rule(specs), reducers)
  targets = {}
  if reference is not None:
    found = sequential.fitted(apply_fn, reference, params, batches, list(specs))
    targets = {path: kernel for path, (kernel, _, _) in found.items()}

  def quantize_layer(path: str, kernel: Any, stats: Any, site: capture.Site) -> QArray:
    leaf_spec = specs[path]
    dims = normalize_contract_dims(site.contract_dims, kernel.ndim, path)
    gram, count = stats["gram"]
    total, _ = stats["abs"]
    codes, scale, zp, s, alpha = awq_matrix(
      kernel_matrix(kernel, dims),
      gram / count,
      total / count,
      leaf_spec,
      grid=grid,
      clip=clip,
      path=path,
    )
    note = f"awq alpha={alpha:g}"
    if leaf_spec.grouped and leaf_spec.group_size > codes.shape[0]:
      note = f"g{leaf_spec.group_size} > K={codes.shape[0]}: per-channel; {note}"
    return QArray.from_codes(
      codes,
      scale,
      zp,
      leaf_spec,
      shape=kernel.shape,
      dtype=kernel.dtype,
      contract_dims=dims,
      input_scale=s,
      note=note,
    )

  def quantize_leaf(path: str, kernel: Any) -> Any:
    if path not in specs:
      return kernel
    kernel = targets.get(path, kernel)
    site = collected.sites[path]
    # A stacked kernel (layers of a scan): each layer searches its own scales.
    per_layer = [
      quantize_layer(path, w, stats, site)
      for w, stats in zip(
        site.per_layer(kernel), capture.layer_stats(collected.stats[path], site), strict=True
      )
    ]
    return per_layer[0] if site.layers is None else stack(per_layer)

  return map_with_path(quantize_leaf, params)
