"""Minitron-style structured pruning of a BERT encoder: fewer heads, channels and layers.

Following Minitron (Muralidharan et al., 2024, "Compact Language Models via Pruning and
Knowledge Distillation"; Sreenivas et al., 2024, "LLM Pruning and Distillation in Practice:
The Minitron Approach"), importance is measured from activations on a few calibration
batches, never from weights or gradients:

- attention head: the mean L2 norm of the head's context vector (its slice of the input to
  the attention output projection), over tokens;
- feed-forward channel: the mean |activation| of the channel after GELU (the input of the
  feed-forward output kernel), over tokens;
- layer (depth): block importance, `1 - mean cosine(layer input, layer output)` over real
  tokens; a layer that barely turns its input is the cheapest to drop.

Heads and channels come from `jaxshrink.capture.collect` (its replay records the inputs of the
`attention/output/kernel` and `output/kernel` matmuls, so the model code is untouched); layer
inputs and outputs from `jaxshrink.distill.taps.tapped_apply` (taps on `embeddings` and each
`encoder/layer_N`). Calibration rows are grouped by length and each batch is trimmed to its
longest sentence, so padding positions barely enter the head and channel means.

`plan_pruning` drops the `layers` least important layers, then removes the same number of
heads and channels from every remaining layer (the lowest ranked in each layer) until the
non-embedding params fit the budget; the feed-forward width absorbs the rounding. Uniform
widths keep the shrunk matmuls regular, so the smaller model is also faster. `shrink_bert`
slices the kept rows and columns into a genuinely smaller dense model, renumbering the kept
layers `encoder/layer_0 ...`; it computes exactly what `masked_params` (removed heads' value
columns and channels' intermediate columns zeroed) computes on the original model.

>>> scores = importance(model, params, batches)             # calibration: train split ids
>>> plan = plan_pruning(scores, bert_config(model), params=0.67)
>>> small, overrides = shrink_bert(params, plan, bert_config(model))
>>> overrides["layer_heads"], overrides["layer_intermediate"]
((8, 8, 8, 8, 8, 8), (1024, 1024, 1024, 1024, 1024, 1024))
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.capture import Reducer, collect
from jaxshrink.distill.taps import tapped_apply
from jaxshrink.errors import InvalidTypeError, InvalidValueError
from jaxshrink.models.bert import BertConfig
from jaxshrink.tree import flatten

# Feed-forward widths are rounded down to a multiple of this (regular matmul tiles).
CHANNEL_MULTIPLE = 8
# One encoder layer's module path; the kernels whose inputs are the heads' context vectors and
# the GELU outputs (importance, and the refit of `jaxshrink.sparsity.refit`).
LAYER = "encoder/layer_{}"
HEAD_INPUT = LAYER + "/attention/output/kernel"
CHANNEL_INPUT = LAYER + "/output/kernel"


@dataclasses.dataclass(frozen=True)
class Importance:
  """Activation-based importance of each structure (higher: more important).

  Attributes:
    heads: per layer, `(heads,)` float32: mean L2 norm of each head's context output.
    channels: per layer, `(intermediate,)` float32: mean |GELU output| of each channel.
    layers: `(num_layers,)` float32: `1 - mean cosine(input, output)` of each layer.
    channel_costs: per layer, `(intermediate,)` float32: the refit error each channel's removal
      adds (`refit_rank.refit_ranked`), or None when ranked by activations.
  """

  heads: tuple[np.ndarray, ...]
  channels: tuple[np.ndarray, ...]
  layers: np.ndarray
  channel_costs: tuple[np.ndarray, ...] | None = None


@dataclasses.dataclass(frozen=True)
class PruningPlan:
  """What a structured pruning keeps, in original indices (each tuple sorted).

  Attributes:
    layers: kept encoder layers, in order.
    heads: for each kept layer, its kept heads.
    channels: for each kept layer, its kept feed-forward channels.
  """

  layers: tuple[int, ...]
  heads: tuple[tuple[int, ...], ...]
  channels: tuple[tuple[int, ...], ...]


def bert_config(model: Any) -> BertConfig:
  """The `BertConfig` a zoo model's NNX constructor is bound to (`partial(BertEncoder, cfg)`).

  Raises:
    InvalidTypeError: for a model that is not a configured BERT encoder.
  """
  module = getattr(model, "module", None)
  if isinstance(module, functools.partial):
    for arg in (*module.args, *module.keywords.values()):
      if isinstance(arg, BertConfig):
        return arg
  raise InvalidTypeError(
    f"structured pruning needs a BERT encoder built from a `BertConfig` (e.g. 'minilm-l6'); "
    f"model {getattr(model, 'name', model)!r} has none. Use `prune` with structure 'channel' "
    "or 'heads' for other models."
  )


def head_norm_reducer(head_size: int) -> Reducer:
  """Per head: summed L2 norm of its `head_size` slice of each row, and the row count."""
  return Reducer(
    init=lambda k: (jnp.zeros((k // head_size,), jnp.float32), jnp.zeros((), jnp.float32)),
    update=lambda s, x, w: (
      s[0]
      + jnp.sum(
        jnp.linalg.norm(x.reshape(x.shape[0], -1, head_size), axis=-1) * w[:, None], axis=0
      ),
      s[1] + jnp.sum(w),
    ),
  )


def abs_mean_reducer() -> Reducer:
  """Per input channel: summed |x| and the row count."""
  return Reducer(
    init=lambda k: (jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.float32)),
    update=lambda s, x, w: (s[0] + jnp.sum(jnp.abs(x) * w[:, None], axis=0), s[1] + jnp.sum(w)),
  )


def _layer_scores(model: Any, params: Any, batches: Sequence[np.ndarray], config: BertConfig):
  taps = {"layer_in": "embeddings"}
  taps |= {f"layer_{i}": f"encoder/layer_{i}" for i in range(config.num_layers)}
  apply = jax.jit(tapped_apply(model, taps))

  def cosines(a, b):
    dot = jnp.sum(a * b, axis=-1)
    return dot / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)

  total, tokens = np.zeros(config.num_layers), 0
  for x in batches:
    out = apply(params, jnp.asarray(x))
    real = np.asarray(x != config.pad_id)
    tokens += int(real.sum())
    before = out["layer_in"]
    for i in range(config.num_layers):
      after = out[f"layer_{i}"]
      total[i] += float(np.asarray(cosines(before, after))[real].sum())
      before = after
  return (1.0 - total / max(tokens, 1)).astype(np.float32)


def importance(model: Any, params: Any, batches: Sequence[np.ndarray]) -> Importance:
  """Head, channel and layer importance of a BERT encoder on calibration batches.

  Args:
    model: a BERT zoo model (`bert_config(model)` finds its config).
    params: its float param tree.
    batches: `(B, L)` int32 token ids (`jaxshrink.pipeline.length_sorted_batches`).

  Returns:
    The `Importance` of every head, feed-forward channel and layer.

  >>> scores = importance(get_model("minilm-l6"), params, batches)
  >>> scores.heads[0].shape, scores.channels[0].shape, scores.layers.shape
  ((12,), (1536,), (6,))
  """
  config = bert_config(model)
  batches = [np.asarray(b) for b in batches]
  if not batches:
    raise InvalidValueError("importance needs at least one calibration batch; got none.")
  layers = range(config.num_layers)
  rule = "|".join(
    [HEAD_INPUT.format(r"\d+"), CHANNEL_INPUT.format(r"\d+")]
  )  # the inputs of these two matmuls are the context vectors and the GELU outputs
  found = collect(
    model.apply,
    params,
    batches,
    rule,
    {"norm": head_norm_reducer(config.head_size), "abs": abs_mean_reducer()},
  )

  def mean(path: str, stat: str) -> np.ndarray:
    total, rows = found.stats[path][stat]
    return (np.asarray(total) / max(float(rows), 1.0)).astype(np.float32)

  heads = tuple(mean(HEAD_INPUT.format(i), "norm") for i in layers)
  channels = tuple(mean(CHANNEL_INPUT.format(i), "abs") for i in layers)
  return Importance(heads, channels, _layer_scores(model, params, batches, config))


def layer_param_count(hidden: int, heads: int, head_size: int, intermediate: int) -> int:
  """Params of one encoder layer: attention (q/k/v/out + biases + LayerNorm) and FFN.

  >>> layer_param_count(384, 12, 32, 1536)   # one all-MiniLM-L6-v2 layer
  1774464
  """
  inner = heads * head_size
  attention = 4 * hidden * inner + 3 * inner + hidden + 2 * hidden
  feed_forward = 2 * hidden * intermediate + intermediate + hidden + 2 * hidden
  return attention + feed_forward


def encoder_param_count(config: BertConfig) -> int:
  """Non-embedding params of a BERT config (all encoder layers)."""
  return sum(
    layer_param_count(config.hidden_size, config.heads(i), config.head_size,
                      config.intermediate(i))
    for i in range(config.num_layers)
  )  # fmt: skip


def _widths(config, kept_layers, budget, heads: bool, channels: bool) -> tuple[int, int]:
  """Uniform `(heads, channels)` per kept layer with the layers' params <= budget."""
  h_full = min(config.heads(i) for i in kept_layers)
  c_full = min(config.intermediate(i) for i in kept_layers)
  n, hidden, d = len(kept_layers), config.hidden_size, config.head_size

  def cost(h: int, c: int) -> int:
    return n * layer_param_count(hidden, h, d, c)

  if cost(h_full, c_full) <= budget or not (heads or channels):
    return h_full, c_full
  # The fraction of width kept in both (continuous), by bisection; heads then round to the
  # nearest count and the channels take whatever budget is left.
  lo, hi = 0.0, 1.0
  for _ in range(50):
    mid = (lo + hi) / 2
    h = h_full * mid if heads else h_full
    c = c_full * mid if channels else c_full
    lo, hi = (mid, hi) if n * layer_param_count(hidden, h, d, c) <= budget else (lo, mid)
  h = max(1, round(h_full * lo)) if heads else h_full
  if not channels:
    while h > 1 and cost(h, c_full) > budget:
      h -= 1
    return h, c_full
  per_channel = n * (2 * hidden + 1)
  spare = budget - cost(h, 0)
  c = max(1, min(c_full, spare // per_channel))
  if c > CHANNEL_MULTIPLE:
    c -= c % CHANNEL_MULTIPLE
  return h, int(c)


def top(scores: np.ndarray, keep: int) -> tuple[int, ...]:
  """The `keep` highest-scored indices, sorted."""
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  return tuple(sorted(int(i) for i in order[:keep]))


def plan_pruning(
  scores: Importance,
  config: BertConfig,
  *,
  params: float = 0.67,
  heads: bool = True,
  channels: bool = True,
  layers: int = 0,
) -> PruningPlan:
  """What to keep so the non-embedding params are at most `params` of the original.

  Args:
    scores: `importance(...)` of the model.
    config: its `BertConfig`.
    params: fraction of non-embedding params to keep, in (0, 1].
    heads: prune attention heads.
    channels: prune feed-forward channels.
    layers: how many whole layers to drop (the least important), before width pruning.

  Returns:
    The `PruningPlan`; every kept layer keeps the same number of heads and channels.

  >>> plan = plan_pruning(scores, BertConfig(), params=0.67)
  >>> len(plan.heads[0]), len(plan.channels[0])
  (8, 1024)
  """
  if isinstance(params, bool) or not isinstance(params, (int, float)) or not 0 < params <= 1:
    raise InvalidValueError(
      f"structured pruning `params` is the fraction of non-embedding params to keep, in (0, 1]; "
      f"got {params!r}. E.g. 0.67 keeps two thirds."
    )
  if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers < config.num_layers:
    raise InvalidValueError(
      f"structured pruning `layers` is how many of the {config.num_layers} layers to drop, "
      f"0 to {config.num_layers - 1}; got {layers!r}."
    )
  drop = set(np.argsort(np.asarray(scores.layers), kind="stable")[:layers].tolist())
  kept = tuple(i for i in range(config.num_layers) if i not in drop)
  budget = int(params * encoder_param_count(config))
  h, c = _widths(config, kept, budget, heads, channels)
  return PruningPlan(
    layers=kept,
    heads=tuple(top(scores.heads[i], h) for i in kept),
    channels=tuple(top(scores.channels[i], c) for i in kept),
  )


def head_columns(kept_heads: Sequence[int], head_size: int) -> np.ndarray:
  """The columns of a `(heads * head_size)` projection that belong to `kept_heads`, in order."""
  heads = np.asarray(kept_heads, np.int64)
  return (heads[:, None] * head_size + np.arange(head_size)).ravel()


def _check_plan(plan: PruningPlan, config: BertConfig) -> None:
  n = len(plan.layers)
  if not n or len(plan.heads) != n or len(plan.channels) != n:
    raise InvalidValueError(
      f"a PruningPlan needs one `heads` and one `channels` entry per kept layer; got "
      f"{n} layers, {len(plan.heads)} head and {len(plan.channels)} channel entries."
    )
  for layer, hs, cs in zip(plan.layers, plan.heads, plan.channels, strict=True):
    if not 0 <= layer < config.num_layers or not hs or not cs:
      raise InvalidValueError(
        f"PruningPlan layer {layer} must exist (0..{config.num_layers - 1}) and keep at least "
        f"one head and one channel; got heads {hs}, channels {len(cs)}."
      )
    if max(hs) >= config.heads(layer) or max(cs) >= config.intermediate(layer):
      raise InvalidValueError(
        f"PruningPlan keeps head {max(hs)} or channel {max(cs)} of layer {layer}, which has "
        f"{config.heads(layer)} heads and {config.intermediate(layer)} channels."
      )


def shrink_bert(
  params: Any, plan: PruningPlan, config: BertConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
  """A smaller dense BERT param tree keeping `plan`'s layers, heads and channels.

  Args:
    params: the float param tree (`embeddings`, `encoder/layer_N/...`).
    plan: what to keep (`plan_pruning`).
    config: the params' `BertConfig`.

  Returns:
    `(params, overrides)`: kept layers renumbered `layer_0 ...`, and the `BertConfig` fields of
    the smaller model (`num_layers`, `head_dim`, `layer_heads`, `layer_intermediate`), as a
    model source records them.
  """
  _check_plan(plan, config)
  flat = {p: np.asarray(v) for p, v in flatten(params).items()}
  out: dict[str, Any] = {"embeddings": jax.tree.map(jnp.asarray, params["embeddings"])}
  layers: dict[str, Any] = {}
  d = config.head_size
  for new, (old, hs, cs) in enumerate(zip(plan.layers, plan.heads, plan.channels, strict=True)):
    prefix = f"encoder/layer_{old}/"
    cols, chans = head_columns(hs, d), np.asarray(cs, np.int64)

    def take(name: str, index: np.ndarray | None, axis: int, prefix=prefix) -> jax.Array:
      value = flat[prefix + name]
      return jnp.asarray(value if index is None else np.take(value, index, axis=axis))

    attention = {
      proj: {"kernel": take(f"attention/{proj}/kernel", cols, 1),
             "bias": take(f"attention/{proj}/bias", cols, 0)}
      for proj in ("query", "key", "value")
    }  # fmt: skip
    attention["output"] = {
      "kernel": take("attention/output/kernel", cols, 0),
      "bias": take("attention/output/bias", None, 0),
    }
    attention["layer_norm"] = {k: take(f"attention/layer_norm/{k}", None, 0)
                               for k in ("scale", "bias")}  # fmt: skip
    layers[f"layer_{new}"] = {
      "attention": attention,
      "intermediate": {"kernel": take("intermediate/kernel", chans, 1),
                       "bias": take("intermediate/bias", chans, 0)},
      "output": {"kernel": take("output/kernel", chans, 0), "bias": take("output/bias", None, 0)},
      "output_norm": {k: take(f"output_norm/{k}", None, 0) for k in ("scale", "bias")},
    }  # fmt: skip
  out["encoder"] = layers
  overrides = {
    "num_layers": len(plan.layers),
    "head_dim": d,
    "layer_heads": tuple(len(h) for h in plan.heads),
    "layer_intermediate": tuple(len(c) for c in plan.channels),
  }
  return out, overrides


def masked_params(params: Any, plan: PruningPlan, config: BertConfig) -> dict[str, Any]:
  """The original-size params with the plan's removed heads and channels zeroed.

  A removed head's value columns and biases are zeroed (its context is then zero), a removed
  channel's intermediate column and bias (GELU(0) = 0). Dropped layers are not masked (a
  post-norm layer cannot be zeroed into the identity). With no layer dropped, the model on
  these params computes what the shrunk model computes.
  """
  _check_plan(plan, config)
  d = config.head_size
  out = jax.tree.map(np.array, params)
  for old, hs, cs in zip(plan.layers, plan.heads, plan.channels, strict=True):
    layer = out["encoder"][f"layer_{old}"]
    removed_cols = np.setdiff1d(np.arange(config.heads(old) * d), head_columns(hs, d))
    layer["attention"]["value"]["kernel"][:, removed_cols] = 0
    layer["attention"]["value"]["bias"][removed_cols] = 0
    removed = np.setdiff1d(np.arange(config.intermediate(old)), np.asarray(cs))
    layer["intermediate"]["kernel"][:, removed] = 0
    layer["intermediate"]["bias"][removed] = 0
  return jax.tree.map(jnp.asarray, out)
