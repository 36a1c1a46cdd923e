"""Wanda: prune by |w| * ||x||, the weight times the L2 norm of its input over calibration data
(Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", 2023).

No weight is updated. One pass takes the input norms from `capture.collect` with
`sum_squares_reducer` on the float model; sequentially (a recipe's default) each block's
kernels choose among rankings on the compressed and the float model's inputs
(`_closest_to_float`, `jaxshrink.sequential`). A kernel stacked by a `scan` ranks each layer on
its own norms.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxshrink import capture, sequential
from jaxshrink.capture import from_matrix
from jaxshrink.errors import InvalidValueError
from jaxshrink.model import accepts_models
from jaxshrink.sparsity.allocation import Pruner, apply_masks
from jaxshrink.sparsity.oneshot import _check_layerwise, _layer_sparsities
from jaxshrink.sparsity.structures import NM, keep_top, nm_mask
from jaxshrink.tree import flatten, map_with_path

# Jitted with the kernel's layout static: run eagerly, each call traced the radix select's loop
# anew, and every compilation stayed cached (MiniLM's sequential peak grew by about 100 MB per
# block); jitted, each kernel shape compiles once for all blocks.
_STATIC = ("structure", "contract_dims", "sparsity", "comparison")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _wanda_mask(w, sum_squares, *, structure, contract_dims, sparsity, comparison):
  """Wanda's keep mask of one kernel (one layer of a stacked one)."""
  norm = jnp.sqrt(sum_squares)
  score = capture.kernel_matrix(jnp.abs(w).astype(jnp.float32), contract_dims)
  score = score * norm[:, None]
  if isinstance(structure, NM):
    full = from_matrix(score, w.shape, contract_dims)
    return nm_mask(full, structure.n, structure.m, structure.axis)
  if comparison == "layer":
    keep = keep_top(score, score.size - round(sparsity * score.size))
    return from_matrix(keep, w.shape, contract_dims)
  rows = score.shape[0]
  keep = rows - round(sparsity * rows)
  per_output = jax.vmap(keep_top, in_axes=(1, None), out_axes=1)(score, keep)
  return from_matrix(per_output, w.shape, contract_dims)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _closest_to_float(w, gram, cross, float_sq, **layout):
  """Sequential Wanda's keep mask of one kernel (one layer of a stacked one).

  Ranked on the compressed model's input norms, the float model's (one pass's ranking) or
  their geometric mean: whichever mask leaves the kernel's output on the calibration rows
  closest to the float model's (`sequential.float_output_error`). On a tie (the first block,
  where both models agree) the compressed model's norms win, as without the float model.
  """
  contract_dims = layout["contract_dims"]
  w2d = capture.kernel_matrix(jnp.asarray(w, jnp.float32), contract_dims)
  sum_squares = jnp.diag(gram)
  masks = [
    _wanda_mask(w, norms, **layout)
    for norms in (sum_squares, float_sq, jnp.sqrt(sum_squares * float_sq))
  ]
  errors = [
    sequential.float_output_error(
      w2d, jnp.where(capture.kernel_matrix(keep, contract_dims), w2d, 0.0), gram, cross
    )
    for keep in masks
  ]
  return jnp.stack(masks)[jnp.argmin(jnp.stack(errors))]  # argmin: the first on a tie


def _layout(pruner, site, sparsity, comparison) -> dict[str, Any]:
  """The static arguments of `_wanda_mask` for one kernel."""
  return {
    "structure": pruner.structure,
    "contract_dims": tuple(site.contract_dims),
    "sparsity": float(sparsity),
    "comparison": comparison,
  }


@accepts_models
def wanda(
  apply_fn: Callable[[Any, Any], Any],
  params: Any,
  batches: Iterable[Any],
  pruner: Pruner,
  *,
  comparison: str = "layer",
) -> Any:
  """Wanda: prune by |w| * ||x||. Returns the pruned params (pruned weights are 0).

  Args:
    apply_fn: `(params, x) -> outputs`, or a model (then leave `params` out; it comes back
      pruned, in its own form).
    params: float param tree.
    batches: calibration inputs.
    pruner: rule, sparsity (uniform/erk/overrides) and structure (unstructured or N:M).
    comparison: `layer` ranks all of a layer's weights together; `output` ranks each output's
      weights on their own (the paper's choice for large LLMs). On tiny-lm at 50%, `layer`
      gives perplexity 5.30 and `output` 5.36 (magnitude: 5.36), so `layer` is the default.

  >>> pruned = wanda(model.apply, params, batches, Pruner(".*kernel", 0.5))
  """
  return _wanda_with_masks(apply_fn, params, batches, pruner, comparison=comparison)[0]


def _wanda_with_masks(
  apply_fn: Callable[[Any, Any], Any],
  params: Any,
  batches: Iterable[Any],
  pruner: Pruner,
  *,
  comparison: str = "layer",
  reference: Any = None,
) -> tuple[Any, Any]:
  """`wanda` and the masks it applied: `(pruned params, bool masks)` (the stage's).

  With `reference` (the float model, sequentially) each kernel's mask is the one of
  `_closest_to_float`.
  """
  _check_layerwise(pruner, "wanda")
  if comparison not in ("layer", "output"):
    raise InvalidValueError(f"wanda `comparison` must be 'layer' or 'output'; got {comparison!r}.")
  paths, sparsities = _layer_sparsities(pruner, params)
  flat = flatten(params)
  if reference is not None:
    paired = sequential.paired_statistics(apply_fn, reference, params, batches, paths)
    sites = {path: paired[path].site for path in paths}

    def layer_masks(path, layout):
      site, stats = sites[path], paired[path]
      per_layer = (site.per_layer(a) for a in (flat[path], stats.gram, stats.cross, stats.float_sq))
      return [_closest_to_float(*args, **layout) for args in zip(*per_layer, strict=True)]
  else:
    stats = capture.collect(
      apply_fn, params, batches, pruner.rule, {"sq": capture.sum_squares_reducer()}
    )
    sites = stats.sites

    def layer_masks(path, layout):
      site = sites[path]
      per_layer = zip(
        site.per_layer(flat[path]), capture.layer_stats(stats.stats[path], site), strict=True
      )
      return [_wanda_mask(w, layer["sq"][0], **layout) for w, layer in per_layer]

  masks = {}
  for path in paths:
    # A stacked kernel (layers of a scan): each layer is ranked on its own input norms.
    site = sites[path]
    per_layer = layer_masks(path, _layout(pruner, site, sparsities[path], comparison))
    masks[path] = per_layer[0] if site.layers is None else jnp.stack(per_layer)
  tree = map_with_path(lambda p, leaf: masks.get(p, jnp.ones((), bool)), params)
  return apply_masks(params, tree), tree
