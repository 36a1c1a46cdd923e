"""Minitron-style structured pruning of a Llama-family decoder, respecting grouped-query heads.

The BERT version is `jaxshrink.sparsity.minitron`; this one follows the same method (importance
from activations on calibration windows of the training split) with the decoder's layout:

- query head: the mean L2 norm of its context vector (its slice of the `o_proj` input);
- key/value group: the summed importance of the query heads that read it;
- MLP channel: the mean |silu(gate) * up| (the `down_proj` input);
- layer: `1 - mean cosine(layer input, layer output)`. A pre-norm layer adds its block to the
  residual stream, so dropping it leaves exactly the identity.

Grouped-query attention constrains what can go: query head `h` reads key/value head
`h // group`, so every group must keep the same number of query heads. `plan_llama` keeps `q`
query heads in each of `kv` groups (the best `q` of each group, the best `kv` groups); it
shrinks the query heads per group first and removes whole groups (with their key and value
projections) only when fewer than one query head per group would be left. Every kept layer
keeps the same counts, so the result is an ordinary `LlamaConfig` (and an ordinary Hugging
Face config): `num_heads = kv * q`, `num_kv_heads = kv`, `head_dim` unchanged.

`shrink_llama` slices the kept columns and rows into a smaller dense model; on the original
model, `masked_llama` (removed heads' `o_proj` rows and removed channels' `down_proj` rows
zeroed) computes the same logits. `refit_llama` then refits each kept layer's `o_proj` and
`down_proj` by least squares to the float layer's outputs (no bias: Llama's have none).

>>> scores = llama_importance(model, params, batches)     # batches: training windows
>>> plan = plan_llama(scores, llama_config(model), params=0.67)
>>> small, overrides = shrink_llama(params, plan, llama_config(model))
>>> overrides                           # doctest: +SKIP
{'num_layers': 6, 'num_heads': 8, 'num_kv_heads': 2, 'head_dim': 32, 'intermediate_size': 608}
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxshrink.capture import collect
from jaxshrink.errors import InvalidTypeError, InvalidValueError
from jaxshrink.models.llama import LlamaConfig
from jaxshrink.sparsity.minitron import (
  CHANNEL_MULTIPLE,
  Importance,
  PruningPlan,
  abs_mean_reducer,
  head_columns,
  head_norm_reducer,
)
from jaxshrink.sparsity.refit import REFIT_DAMP, input_grams, refit_kernel
from jaxshrink.tree import flatten

LAYER = "model/layers/{}/"
HEAD_INPUT = LAYER + "self_attn/o_proj/kernel"
CHANNEL_INPUT = LAYER + "mlp/down_proj/kernel"


def llama_config(model: Any) -> LlamaConfig:
  """The `LlamaConfig` a zoo model's NNX constructor is bound to (`partial(LlamaForCausalLM,
  cfg)`).

  Raises:
    InvalidTypeError: for a model that is not a configured Llama decoder.
  """
  module = getattr(model, "module", None)
  if isinstance(module, functools.partial):
    for arg in (*module.args, *module.keywords.values()):
      if isinstance(arg, LlamaConfig):
        return arg
  raise InvalidTypeError(
    f"model {getattr(model, 'name', model)!r} is not a Llama decoder built from a `LlamaConfig`."
  )


def training_windows(ids: np.ndarray, batches: int, rows: int) -> list[np.ndarray]:
  """Up to `batches` batches of `rows` token windows from the start of the training split."""
  ids = np.asarray(ids)
  if ids.ndim != 2 or ids.shape[0] == 0:
    raise InvalidValueError(
      f"calibration needs (N, L) token windows with N >= 1; got shape {ids.shape}."
    )
  chosen = ids[: batches * rows].astype(np.int32)
  return [b for b in np.array_split(chosen, max(1, -(-len(chosen) // rows))) if len(b)]


def _residual_streams(model: Any):
  """A jitted `(params, tokens) -> [embeddings, after layer 0, ...]` for a Llama zoo model (a
  decoder layer returns `(hidden, cache)`, which taps do not record, so the layers are run here
  one by one)."""
  abstract = nnx.eval_shape(lambda: model.module(rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)

  @jax.jit
  def streams(params, tokens):
    state = jax.tree.map(lambda leaf: leaf, abstract_state)
    nnx.replace_by_pure_dict(state, params)
    decoder = nnx.merge(graphdef, state).model
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    x = decoder.embed_tokens(tokens)
    out = [x]
    for layer in decoder.layers:
      x, _ = layer(x, positions)
      out.append(x)
    return out

  return streams


def _layer_scores(model: Any, params: Any, batches: Sequence[np.ndarray], layers: int):
  streams = _residual_streams(model)

  def cosine(a, b):
    dot = jnp.sum(a * b, axis=-1)
    return dot / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)

  total, tokens = np.zeros(layers), 0
  for x in batches:
    out = streams(params, jnp.asarray(x))
    tokens += int(np.prod(x.shape))
    for i in range(layers):
      total[i] += float(jnp.sum(cosine(out[i], out[i + 1])))
  return (1.0 - total / max(tokens, 1)).astype(np.float32)


def llama_importance(model: Any, params: Any, batches: Sequence[np.ndarray]) -> Importance:
  """Query-head, MLP-channel and layer importance of a Llama decoder on calibration windows.

  >>> scores = llama_importance(get_model("llama-tiny"), params, batches)
  >>> scores.heads[0].shape, scores.channels[0].shape, scores.layers.shape
  ((10,), (1056,), (6,))
  """
  config = llama_config(model)
  batches = [np.asarray(b) for b in batches]
  if not batches:
    raise InvalidValueError("importance needs at least one calibration batch; got none.")
  rule = "|".join([HEAD_INPUT.format(r"\d+"), CHANNEL_INPUT.format(r"\d+")])
  reducers = {"norm": head_norm_reducer(config.head_size), "abs": abs_mean_reducer()}
  found = collect(model.apply, params, batches, rule, reducers)

  def mean(path: str, stat: str) -> np.ndarray:
    total, rows = found.stats[path][stat]
    return (np.asarray(total) / max(float(rows), 1.0)).astype(np.float32)

  layers = range(config.num_layers)
  heads = tuple(mean(HEAD_INPUT.format(i), "norm") for i in layers)
  channels = tuple(mean(CHANNEL_INPUT.format(i), "abs") for i in layers)
  return Importance(heads, channels, _layer_scores(model, params, batches, config.num_layers))


def layer_param_count(config: LlamaConfig, heads: int, kv_heads: int, intermediate: int) -> int:
  """Params of one decoder layer with these widths: q/k/v/o (and q/k/v biases), the SwiGLU MLP
  and both RMSNorm scales.

  >>> layer_param_count(LlamaConfig(hidden_size=320, num_heads=10, num_kv_heads=2), 10, 2, 1056)
  1449600
  """
  hidden, d = config.hidden_size, config.head_size
  inner, kv = heads * d, kv_heads * d
  attention = 2 * hidden * inner + 2 * hidden * kv
  if config.attention_bias:
    attention += inner + 2 * kv
  return attention + 3 * hidden * intermediate + 2 * hidden


def decoder_param_count(config: LlamaConfig) -> int:
  """Non-embedding params of a Llama config: its decoder layers (not the embedding, the head
  or the final norm, which pruning leaves alone)."""
  per_layer = layer_param_count(
    config, config.num_heads, config.num_kv_heads, config.intermediate_size
  )
  return config.num_layers * per_layer


def _head_counts(config: LlamaConfig, heads: float) -> tuple[int, int]:
  """`(kv groups, query heads per group)` for about `heads` query heads in all."""
  group = config.num_heads // config.num_kv_heads
  per_group = int(round(heads / config.num_kv_heads))
  if per_group >= 1:
    return config.num_kv_heads, min(group, per_group)
  return max(1, int(round(heads))), 1


def _widths(config, layers: int, budget: int, heads: bool, channels: bool):
  """Uniform `(kv groups, heads per group, channels)` with `layers` layers' params <= budget."""
  kv_full, group = config.num_kv_heads, config.num_heads // config.num_kv_heads
  c_full = config.intermediate_size

  def cost(kv: int, q: int, c: int) -> int:
    return layers * layer_param_count(config, kv * q, kv, c)

  if cost(kv_full, group, c_full) <= budget or not (heads or channels):
    return kv_full, group, c_full
  lo, hi = 0.0, 1.0  # the width fraction kept in both, by bisection
  for _ in range(50):
    mid = (lo + hi) / 2
    h = config.num_heads * mid if heads else config.num_heads
    c = c_full * mid if channels else c_full
    kv_now = kv_full if h >= kv_full else max(1.0, h)  # below one head per group: fewer groups
    fits = layers * layer_param_count(config, h, kv_now, c) <= budget
    lo, hi = (mid, hi) if fits else (lo, mid)
  kv, q = _head_counts(config, config.num_heads * lo) if heads else (kv_full, group)
  if not channels:
    while (kv, q) != (1, 1) and cost(kv, q, c_full) > budget:
      kv, q = (kv, q - 1) if q > 1 else (kv - 1, 1)
    return kv, q, c_full
  per_channel = layers * 3 * config.hidden_size
  spare = budget - cost(kv, q, 0)
  c = max(1, min(c_full, spare // per_channel))
  if c > CHANNEL_MULTIPLE:
    c -= c % CHANNEL_MULTIPLE
  return kv, q, int(c)


def _top(scores: np.ndarray, keep: int) -> np.ndarray:
  return np.sort(np.argsort(-np.asarray(scores, np.float64), kind="stable")[:keep])


def kept_heads(scores: np.ndarray, config: LlamaConfig, kv: int, q: int) -> tuple[int, ...]:
  """The kept query heads of one layer: the best `q` of each of its best `kv` groups, group by
  group, so new head `h` still reads new key/value head `h // q`."""
  group = config.num_heads // config.num_kv_heads
  by_group = np.asarray(scores, np.float64).reshape(config.num_kv_heads, group)
  groups = _top(by_group.sum(axis=1), kv)
  return tuple(int(g * group + h) for g in groups for h in _top(by_group[g], q))


def kept_groups(heads: Sequence[int], config: LlamaConfig) -> tuple[int, ...]:
  """The key/value heads that the kept query heads read, in order."""
  group = config.num_heads // config.num_kv_heads
  return tuple(sorted({h // group for h in heads}))


def plan_llama(
  scores: Importance,
  config: LlamaConfig,
  *,
  params: float = 0.67,
  heads: bool = True,
  channels: bool = True,
  layers: int = 0,
) -> PruningPlan:
  """What to keep so the decoder layers' params are at most `params` of the original.

  Arguments as `minitron.plan_pruning`; the heads of each kept layer are listed group by group
  (`kept_heads`), every group keeping the same number.
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
  budget = int(params * decoder_param_count(config))
  kv, q, c = _widths(config, len(kept), budget, heads, channels)
  return PruningPlan(
    layers=kept,
    heads=tuple(kept_heads(scores.heads[i], config, kv, q) for i in kept),
    channels=tuple(tuple(int(j) for j in _top(scores.channels[i], c)) for i in kept),
  )


def _check_plan(plan: PruningPlan, config: LlamaConfig) -> tuple[int, int]:
  """`(kv groups, heads per group)` of a valid plan; raises for an invalid one."""
  counts = set()
  for layer, hs, cs in zip(plan.layers, plan.heads, plan.channels, strict=True):
    groups = kept_groups(hs, config)
    per = len(hs) // max(len(groups), 1)
    group = config.num_heads // config.num_kv_heads
    uniform = all(sum(h // group == g for h in hs) == per for g in groups)
    if not 0 <= layer < config.num_layers or not hs or not cs or not uniform:
      raise InvalidValueError(
        f"a Llama PruningPlan keeps, in every layer, the same number of query heads in each kept "
        f"key/value group and at least one channel; layer {layer} keeps heads {hs} (groups of "
        f"{group}) and {len(cs)} channels."
      )
    if max(hs) >= config.num_heads or max(cs) >= config.intermediate_size:
      raise InvalidValueError(
        f"PruningPlan keeps head {max(hs)} or channel {max(cs)} of layer {layer}, which has "
        f"{config.num_heads} heads and {config.intermediate_size} channels."
      )
    counts.add((len(groups), per, len(cs)))
  if len(counts) != 1:
    raise InvalidValueError(
      f"a Llama PruningPlan keeps the same widths in every layer (one LlamaConfig); got {counts}."
    )
  kv, per, _ = counts.pop()
  return kv, per


def shrink_llama(
  params: Any, plan: PruningPlan, config: LlamaConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
  """A smaller dense Llama param tree keeping `plan`'s layers, heads, groups and channels.

  Returns:
    `(params, overrides)`: kept layers renumbered `0 ...`, and the `LlamaConfig` fields of the
    smaller model (`num_layers`, `num_heads`, `num_kv_heads`, `head_dim`, `intermediate_size`).
  """
  kv, per = _check_plan(plan, config)
  d = config.head_size
  flat = {p: np.asarray(v) for p, v in flatten(params).items()}
  out = jax.tree.map(jnp.asarray, {k: v for k, v in params.items() if k != "model"})
  model = {k: jax.tree.map(jnp.asarray, v) for k, v in params["model"].items() if k != "layers"}
  layers: dict[str, Any] = {}
  for new, (old, hs, cs) in enumerate(zip(plan.layers, plan.heads, plan.channels, strict=True)):
    prefix = LAYER.format(old)
    q_cols, kv_cols = head_columns(hs, d), head_columns(kept_groups(hs, config), d)
    chans = np.asarray(cs, np.int64)

    def take(name, index, axis, prefix=prefix):
      value = flat[prefix + name]
      return jnp.asarray(value if index is None else np.take(value, index, axis=axis))

    attention = {"o_proj": {"kernel": take("self_attn/o_proj/kernel", q_cols, 0)}}
    for proj, cols in (("q_proj", q_cols), ("k_proj", kv_cols), ("v_proj", kv_cols)):
      attention[proj] = {"kernel": take(f"self_attn/{proj}/kernel", cols, 1)}
      if prefix + f"self_attn/{proj}/bias" in flat:
        attention[proj]["bias"] = take(f"self_attn/{proj}/bias", cols, 0)
    layers[str(new)] = {
      "self_attn": attention,
      "mlp": {
        "gate_proj": {"kernel": take("mlp/gate_proj/kernel", chans, 1)},
        "up_proj": {"kernel": take("mlp/up_proj/kernel", chans, 1)},
        "down_proj": {"kernel": take("mlp/down_proj/kernel", chans, 0)},
      },
      "input_layernorm": {"scale": take("input_layernorm/scale", None, 0)},
      "post_attention_layernorm": {"scale": take("post_attention_layernorm/scale", None, 0)},
    }
  _check_layer_keys(params["model"]["layers"], layers)
  out["model"] = {**model, "layers": _like(params["model"]["layers"], layers)}
  overrides = {
    "num_layers": len(plan.layers),
    "num_heads": kv * per,
    "num_kv_heads": kv,
    "head_dim": d,
    "intermediate_size": len(plan.channels[0]),
  }
  return out, overrides


def _like(original: Any, layers: dict[str, Any]) -> Any:
  """`layers` keyed like the original tree (int or str layer keys)."""
  if original and all(isinstance(k, int) for k in original):
    return {int(k): v for k, v in layers.items()}
  return layers


def _check_layer_keys(original: Any, layers: dict[str, Any]) -> None:
  first = next(iter(original.values()))
  want = set(flatten(first))
  got = set(flatten(layers["0"]))
  if want != got:
    raise InvalidValueError(
      f"structured pruning knows the Llama layer params {sorted(got)}; this model's layers "
      f"hold {sorted(want)}. Prune it with `prune` (structure 'channel') instead."
    )


def masked_llama(params: Any, plan: PruningPlan, config: LlamaConfig) -> Any:
  """The original-size params with the plan's removed heads and channels zeroed (their `o_proj`
  and `down_proj` rows), which computes what `shrink_llama`'s model computes when no layer is
  dropped."""
  _check_plan(plan, config)
  d = config.head_size
  out = jax.tree.map(np.array, params)
  for old, hs, cs in zip(plan.layers, plan.heads, plan.channels, strict=True):
    layer = layer_params(out, old)
    removed = np.setdiff1d(np.arange(config.num_heads * d), head_columns(hs, d))
    layer["self_attn"]["o_proj"]["kernel"][removed] = 0
    gone = np.setdiff1d(np.arange(config.intermediate_size), np.asarray(cs))
    layer["mlp"]["down_proj"]["kernel"][gone] = 0
  return jax.tree.map(jnp.asarray, out)


def layer_params(tree: Any, index: int) -> Any:
  layers = tree["model"]["layers"]
  return layers[index] if index in layers else layers[str(index)]


def llama_output_grams(
  apply_fn: Any, params: Any, layers: Sequence[int], batches: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
  """The Grams of the `o_proj` and `down_proj` inputs of `layers` (no bias column: Llama's
  projections have none), from one pass over `batches`."""
  paths = [f.format(old) for old in layers for f in (HEAD_INPUT, CHANNEL_INPUT)]
  return input_grams(apply_fn, params, paths, batches, bias=False)


def refit_llama(
  apply_fn: Any,
  params: Any,
  small: dict[str, Any],
  plan: PruningPlan,
  config: LlamaConfig,
  batches: Sequence[np.ndarray],
  *,
  damp: float = REFIT_DAMP,
  grams: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
  """`small` with every kept layer's `o_proj` and `down_proj` refitted by least squares to the
  float layer's outputs on `batches` (see `jaxshrink.sparsity.refit`); `grams` as
  `llama_output_grams` returns them, when already collected."""
  if grams is None:
    grams = llama_output_grams(apply_fn, params, plan.layers, batches)
  d = config.head_size
  out = jax.tree.map(lambda leaf: leaf, small)
  for new, (old, hs, cs) in enumerate(zip(plan.layers, plan.heads, plan.channels, strict=True)):
    layer, original = layer_params(out, new), layer_params(params, old)
    for path, kept, target, source in (
      (HEAD_INPUT.format(old), head_columns(hs, d), layer["self_attn"]["o_proj"],
       original["self_attn"]["o_proj"]),
      (CHANNEL_INPUT.format(old), np.asarray(cs, np.int64), layer["mlp"]["down_proj"],
       original["mlp"]["down_proj"]),
    ):  # fmt: skip
      kernel = refit_kernel(grams[path], np.asarray(source["kernel"]), kept, damp)
      target["kernel"] = jnp.asarray(kernel)
  return out


def param_counts(config: LlamaConfig, overrides: dict[str, Any]) -> tuple[int, int]:
  """Decoder-layer params before and after the `overrides` of `shrink_llama`."""
  return decoder_param_count(config), decoder_param_count(dataclasses.replace(config, **overrides))
