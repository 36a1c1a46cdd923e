"""Per-layer feed-forward widths for a BERT encoder: fewer channels where they cost least.

`minitron.plan_pruning` cuts every layer to the same width. Layers are not equally sensitive:
on all-MiniLM-L6-v2, halving the channels of layer 5 alone costs the output embedding about
2.8 times what halving layer 2 does. `allocate_widths` spends the same channel budget
unevenly:

1. The refit error of each channel's removal in each layer is known from the ranking
   (`refit_rank.refit_ranked` records it as `Importance.channel_costs`), but in that layer's
   output units, so it is not comparable across layers.
2. Each layer is cut alone to the uniform width and refitted, and the drop of the output
   embedding's cosine on the calibration batches, divided by that layer's summed refit error,
   gives the layer's scale: what a unit of its refit error costs at the model's output.
3. Channels then go one by one, across all layers, in the order of their scaled costs, until
   the uniform plan's channel count is reached; each width is rounded down to a multiple of
   `minitron.CHANNEL_MULTIPLE` (regular matmul tiles), and none goes under `min_fraction` of
   the layer.

The plan keeps the params of the uniform one (a channel costs the same in every layer). On
MiniLM with 768 channels per layer on average, calibrated on 1024 transfer-corpus sentences,
the widths come out `(720, 728, 608, 648, 984, 904)` and the held-out cosine before recovery
goes from 0.910 (uniform) to 0.913. Measuring the scales costs one projection refit and one pass
over the calibration batches per layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.models.bert import BertConfig
from jaxshrink.sparsity.minitron import (
  CHANNEL_INPUT,
  CHANNEL_MULTIPLE,
  Importance,
  PruningPlan,
  shrink_bert,
  top,
)
from jaxshrink.sparsity.refit import refit_dense, refit_outputs

# No layer keeps fewer than this fraction of its channels.
MIN_FRACTION = 0.125


def _order(costs: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """The costs in removal order (the lowest elimination score went first)."""
  return np.asarray(costs, np.float64)[np.argsort(scores, kind="stable")]


def _mean_cosine(a: jax.Array, b: jax.Array) -> float:
  dot = jnp.sum(a * b, axis=-1)
  norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return float(jnp.mean(dot / jnp.maximum(norms, 1e-12)))


def layer_scales(
  model: Any,
  params: Any,
  scores: Importance,
  plan: PruningPlan,
  config: BertConfig,
  batches: Sequence[np.ndarray],
  grams: dict[str, np.ndarray],
) -> np.ndarray:
  """Per kept layer: the output cosine drop of cutting that layer alone to its `plan` width,
  over the refit error that cut leaves (step 2 above). When the plan also drops layers or cuts
  heads, the drop is counted from the plan with every kept layer's channels whole, so those
  are not charged to the layer.

  A trial zeroes the cut channels' rows of the layer's output projection and refits its kept
  rows, in a model of whole widths: the same function as slicing the channels out (a zero row
  adds nothing), with one compiled program for every trial instead of one per trial and batch
  length."""
  from jaxshrink.models.configured import configure_model

  heads_whole = all(len(h) == config.heads(i) for i, h in zip(plan.layers, plan.heads, strict=True))
  only_channels = len(plan.layers) == config.num_layers and heads_whole
  inputs = [jnp.asarray(b) for b in batches]
  float_apply = jax.jit(model.apply)
  reference = [float_apply(params, x) for x in inputs]
  base, apply = params, float_apply
  if not only_channels:
    whole = tuple(tuple(range(config.intermediate(i))) for i in plan.layers)
    base_plan = dataclasses.replace(plan, channels=whole)
    base, overrides = shrink_bert(params, base_plan, config)
    base = refit_outputs(model.apply, params, base, base_plan, config, batches, grams=grams)
    apply = jax.jit(configure_model(model, overrides).apply)

  def drop(tree: Any) -> float:
    return float(np.mean([
      1.0 - _mean_cosine(apply(tree, x), ref) for x, ref in zip(inputs, reference, strict=True)
    ]))  # fmt: skip

  base_drop = 0.0 if only_channels else drop(base)
  scales = []
  for new, (old, kept) in enumerate(zip(plan.layers, plan.channels, strict=True)):
    source = params["encoder"][f"layer_{old}"]["output"]
    kept = np.asarray(kept, np.int64)
    kernel, bias = refit_dense(grams[CHANNEL_INPUT.format(old)], source, kept)
    masked = np.zeros(np.shape(source["kernel"]), kernel.dtype)
    masked[kept] = kernel
    tree = jax.tree.map(lambda leaf: leaf, base)  # new containers, the same leaves
    layer = tree["encoder"][f"layer_{new}"]
    layer["output"] = {**layer["output"], "kernel": jnp.asarray(masked), "bias": jnp.asarray(bias)}
    removed = _order(scores.channel_costs[old], scores.channels[old])
    error = removed[: config.intermediate(old) - len(kept)].sum()
    scales.append(max(drop(tree) - base_drop, 0.0) / max(error, 1e-30))
  return np.asarray(scales)


def allocate_widths(
  scores: Importance,
  plan: PruningPlan,
  config: BertConfig,
  scales: np.ndarray,
  *,
  min_fraction: float = MIN_FRACTION,
) -> tuple[int, ...]:
  """Per kept layer, its width, with no more channels in all than `plan` keeps (step 3).

  >>> allocate_widths(scores, plan, config, scales)       # doctest: +SKIP
  (720, 728, 608, 648, 984, 904)
  """
  full = [config.intermediate(i) for i in plan.layers]
  floor = [max(CHANNEL_MULTIPLE, int(min_fraction * f)) for f in full]
  budget = sum(len(c) for c in plan.channels)
  costs = [
    scale * _order(scores.channel_costs[i], scores.channels[i])
    for i, scale in zip(plan.layers, scales, strict=True)
  ]
  widths, taken = list(full), [0] * len(full)
  while sum(widths) > budget:
    nxt = [
      c[t] if w > lo else np.inf
      for c, t, w, lo in zip(costs, taken, widths, floor, strict=True)
    ]  # fmt: skip
    j = int(np.argmin(nxt))
    if not np.isfinite(nxt[j]):
      break
    taken[j] += 1
    widths[j] -= 1
  return tuple(w - w % CHANNEL_MULTIPLE if w > CHANNEL_MULTIPLE else w for w in widths)


def allocated_plan(
  model: Any,
  params: Any,
  scores: Importance,
  plan: PruningPlan,
  config: BertConfig,
  batches: Sequence[np.ndarray],
  grams: dict[str, np.ndarray],
) -> PruningPlan:
  """`plan` with its channels reallocated across the kept layers (`allocate_widths`); heads
  and kept layers as they were. `scores` must hold `channel_costs` (`ranking: refit`)."""
  scales = layer_scales(model, params, scores, plan, config, batches, grams)
  widths = allocate_widths(scores, plan, config, scales)
  channels = tuple(top(scores.channels[i], w) for i, w in zip(plan.layers, widths, strict=True))
  return dataclasses.replace(plan, channels=channels)
