"""Structured surgery: channel-pruned layers become genuinely smaller layers.

After `Channel(-1)` pruning zeroes whole output channels (kernel columns and
their bias entries), `shrink_params` drops them from the producer and slices
the matching input rows of the layer that consumes them: a Dense 256 -> 64
features, the next Dense's kernel 256 -> 64 rows; a conv's filters, the next
conv's input channels; a conv feeding a flatten + Dense, the Dense rows of
those channels. The shrunk model computes what the masked model computes
(a pruned channel is exactly zero after its bias and a zero-preserving
activation such as ReLU or GELU), with smaller arrays.

After `Heads` pruning, `shrink_heads` removes the pruned heads: the query/key/value
kernels lose those heads' output columns (and bias entries), the attention output
projection the matching input rows. A removed head contributed nothing (its value
columns or output rows were zero), and the kept heads keep their size, so the
outputs are unchanged.

Every function here returns the smaller params first, then what describes them:
`shrink_params` -> `(params, widths)`, `shrink_heads` -> `(params, heads, head_size)`,
`shrink` -> `(params, config)`, `shrink_model` -> `(params, model)`.

`shrink_model` also returns the matching model configuration: a `ZooModel` rebuilt
with the new sizes (`jaxshrink.models.configured`). Channel shrinking sets the
width fields of zoo models (or any model given `fields`); head shrinking sets
`head_dim` and `layer_heads` (heads per attention layer, in layer order), the
fields `TinyLM` takes. `shrink` returns the config itself, so a recipe records
`model_source("tiny-lm", config)` in the checkpoint and `jaxshrink eval` rebuilds it.

>>> pruned = oneshot_prune(params, pruner)  # pruner: structure "channel" or Heads(4)
>>> masks = pruned_masks(pruned, pruner)
>>> small_params, small_model = shrink_model(model, pruned, masks)
>>> small_params["dense1"]["kernel"].shape      # (1024, 64) instead of (1024, 128)
>>> small_params, small_lm = shrink_model(lm, pruned, masks, structure=Heads(4))
>>> small_lm.name                               # 'tiny-lm(head_dim=40, layer_heads=(2, 2, 2, 2))'
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxshrink.errors import InvalidValueError
from jaxshrink.sparsity.structures import Channel, Heads, Structure, parse_structure
from jaxshrink.tree import flatten, map_with_path

# Zoo models: producer kernel -> constructor field holding its output width.
ZOO_FIELDS: dict[str, dict[str, str]] = {
  "digits-mlp": {"dense1/kernel": "hidden1", "dense2/kernel": "hidden2"},
  "digits-cnn": {
    "conv1/kernel": "channels1",
    "conv2/kernel": "channels2",
    "dense1/kernel": "hidden",
  },
}
ZOO_FIELDS["digits-mlp-nnx"] = ZOO_FIELDS["digits-mlp"]
ZOO_FIELDS["digits-cnn-nnx"] = ZOO_FIELDS["digits-cnn"]


def kept_channels(mask: Any, *, path: str = "<mask>") -> np.ndarray:
  """Indices of output channels (last axis) that keep any weight."""
  mask = np.asarray(mask, bool)
  if mask.ndim < 2:
    raise InvalidValueError(
      f"`{path}` has no channel mask (shape {mask.shape}); prune it with structure 'channel'."
    )
  return np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0))


def _slice_inputs(kernel: np.ndarray, keep: np.ndarray, channels: int, path: str) -> np.ndarray:
  rows = kernel.shape[-2]
  if rows == channels:
    return np.take(kernel, keep, axis=-2)
  if rows % channels:
    raise InvalidValueError(
      f"Cannot slice the inputs of `{path}` (shape {kernel.shape}) to the {channels} channels "
      "of its producer: its input size is not a multiple. Pass `links` that pair each "
      "producer with the layer that consumes its output."
    )
  # A flatten of (..., channels) feature maps: channels vary fastest in each input row block.
  blocks = kernel.reshape(*kernel.shape[:-2], rows // channels, channels, kernel.shape[-1])
  blocks = np.take(blocks, keep, axis=-2)
  return blocks.reshape(*kernel.shape[:-2], -1, kernel.shape[-1])


def shrink_params(
  params: Any, masks: Any, links: Sequence[tuple[str, str | None]]
) -> tuple[Any, dict[str, int]]:
  """Drops pruned output channels of each producer and the matching inputs of its consumer.

  Args:
    params: channel-pruned params (pruned channels are zero).
    masks: bool masks from a `Channel(-1)` pruner.
    links: `(producer kernel path, consumer kernel path or None)` pairs, in any order.

  Returns:
    `(smaller params, {producer path: kept channels})`.
  """
  flat = {p: np.asarray(v) for p, v in flatten(params).items()}
  flat_masks = flatten(masks)
  widths: dict[str, int] = {}
  for producer, consumer in links:
    if producer not in flat_masks or np.ndim(flat_masks[producer]) == 0:
      raise InvalidValueError(f"`{producer}` was not pruned: no channel mask. Add it to the rule.")
    channels = flat[producer].shape[-1]
    keep = kept_channels(flat_masks[producer], path=producer)
    if keep.size == 0:
      keep = np.array([0])  # a layer needs one feature; its weights are zero anyway
    flat[producer] = np.take(flat[producer], keep, axis=-1)
    bias = producer.rsplit("/", 1)[0] + "/bias"
    if bias in flat and flat[bias].shape == (channels,):
      flat[bias] = flat[bias][keep]
    if consumer is not None:
      flat[consumer] = _slice_inputs(flat[consumer], keep, channels, consumer)
    widths[producer] = int(keep.size)
  return map_with_path(lambda path, leaf: flat[path], params), widths


def sequential_links(paths: Sequence[str]) -> list[tuple[str, str | None]]:
  """Each kernel feeds the next one in `paths` (a plain feed-forward stack)."""
  return [(a, b) for a, b in zip(paths[:-1], paths[1:], strict=True)]


def model_heads(model: Any) -> dict[str, int]:
  """`{"num_heads": n}` or `{"head_size": d}` read from a model's module or config, else `{}`.

  Looks at the Linen module's fields, or, for an NNX constructor bound with
  `functools.partial`, at the arguments it was bound to (a config such as `BertConfig`).
  A set `head_dim` wins: a shrunk model's layers differ in head count, not head size.
  """
  module = getattr(model, "module", None)
  candidates = [module]
  if isinstance(module, functools.partial):
    candidates += [*module.args, *module.keywords.values()]
  for obj in candidates:
    heads = getattr(obj, "num_heads", None)
    if isinstance(heads, int) and not isinstance(heads, bool):
      head_dim = getattr(obj, "head_dim", None)
      if isinstance(head_dim, int) and getattr(obj, "layer_heads", None) is not None:
        return {"head_size": head_dim}
      return {"num_heads": heads}
  return {}


def _layer_order(prefix: str) -> list:
  """Natural order: `block_2` before `block_10`."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", prefix)]


def shrink_heads(params: Any, masks: Any, structure: Heads) -> tuple[Any, dict[str, int], int]:
  """Removes pruned attention heads: q/k/v output columns (and biases), out-projection rows.

  Args:
    params: head-pruned params (pruned heads are zero).
    masks: bool masks from a `Heads` pruner.
    structure: the `Heads` structure they were pruned with.

  Returns:
    `(smaller params, {attention prefix: heads kept} for every attention layer, head size)`.

  Raises:
    InvalidValueError: when no attention kernel was pruned, heads differ in size between
      layers, or a removed head still contributes (neither its value columns nor its output
      rows are zero).
  """
  flat = {p: np.asarray(v) for p, v in flatten(params).items()}
  flat_masks = flatten(masks)
  names = structure.qkv + structure.out
  pattern = re.compile(rf"(.*)/({'|'.join(map(re.escape, names))})/kernel")
  layers: dict[str, dict[str, str]] = {}
  for path in flat:
    match = pattern.fullmatch(path)
    if match is not None and flat[path].ndim == 2:
      layers.setdefault(match.group(1), {})[match.group(2)] = path
  layers = {k: v for k, v in layers.items() if set(v) & set(structure.qkv)}
  pruned = [p for p, f in layers.items() if any(np.ndim(flat_masks.get(k, ())) for k in f.values())]
  if not pruned:
    raise InvalidValueError(
      "shrink found no head-pruned attention kernel (*/{query,key,value,out}/kernel with a "
      "mask); prune with structure 'heads' and target e.g. '.*attention/.*/kernel' first."
    )
  kept: dict[str, int] = {}
  sizes: set[int] = set()
  for prefix in sorted(layers, key=_layer_order):
    found = layers[prefix]
    qkv_path = next(found[n] for n in structure.qkv if n in found)
    width = flat[qkv_path].shape[1]
    heads = structure.heads_of(qkv_path, width)
    head_size = width // heads
    sizes.add(head_size)
    if prefix not in pruned:
      kept[prefix] = heads
      continue
    keep = np.zeros(heads, bool)
    for name, path in found.items():
      mask = flat_masks.get(path, ())
      if np.ndim(mask):
        mask = np.asarray(mask, bool)
        per_head = mask.T if name in structure.out else mask
        keep |= per_head.reshape(-1, heads, head_size).any(axis=(0, 2))
    _check_removed_heads(flat, prefix, found, structure, ~keep, head_size)
    heads_kept = np.flatnonzero(keep)
    if heads_kept.size == 0:
      heads_kept = np.array([0])  # a layer needs one head; its contribution is zero anyway
    columns = (heads_kept[:, None] * head_size + np.arange(head_size)).ravel()
    for name, path in found.items():
      axis = 0 if name in structure.out else 1
      flat[path] = np.take(flat[path], columns, axis=axis)
      bias = path.rsplit("/", 1)[0] + "/bias"
      if axis == 1 and bias in flat and flat[bias].shape == (width,):
        flat[bias] = flat[bias][columns]
    kept[prefix] = int(heads_kept.size)
  if len(sizes) != 1:
    raise InvalidValueError(
      f"attention heads differ in size between layers ({sorted(sizes)} features); the shrunk "
      "model takes one `head_dim`. Pass `Heads(head_size=...)` matching the model."
    )
  return map_with_path(lambda path, leaf: flat[path], params), kept, sizes.pop()


def _check_removed_heads(flat, prefix, found, structure, removed, head_size) -> None:
  """A head can go only if its output is zero: value columns and bias, or output rows."""
  if not removed.any():
    return
  zero = np.zeros(removed.shape, bool)
  for name, path in found.items():
    w = flat[path]
    if name in structure.out:
      zero |= (w.reshape(-1, head_size, w.shape[1]) == 0).all(axis=(1, 2))
    elif name == structure.qkv[-1]:
      heads = (w.reshape(w.shape[0], -1, head_size) == 0).all(axis=(0, 2))
      bias = flat.get(path.rsplit("/", 1)[0] + "/bias")
      if bias is not None and bias.shape == (w.shape[1],):
        heads &= (bias.reshape(-1, head_size) == 0).all(axis=1)
      zero |= heads
  live = np.flatnonzero(removed & ~zero)
  if live.size:
    raise InvalidValueError(
      f"heads {live.tolist()} of `{prefix}` have no kept weight in the selected "
      f"projections but their {structure.qkv[-1]} columns and {'/'.join(structure.out)} rows are "
      "not zero, so removing them would change the outputs. Include the value and output "
      "kernels in `target` (e.g. '.*attention/.*/kernel')."
    )


def heads_config(kept: Mapping[str, int], head_size: int) -> dict[str, Any]:
  """The model fields of a head-shrunk model: `head_dim` and per-layer `layer_heads`."""
  return {"head_dim": int(head_size), "layer_heads": tuple(kept[p] for p in kept)}


def _structure(model: Any, structure: Any) -> Structure:
  if structure is None or structure == "channel":
    return Channel(-1)
  if structure == "heads":
    sizes = model_heads(model)
    if not sizes:
      raise InvalidValueError(
        f"shrink with structure 'heads' needs the head count of model {model.name!r}, which "
        "has no `num_heads` in its module or config; pass `Heads(num_heads=...)`."
      )
    return parse_structure("heads", **sizes)
  return parse_structure(structure)


def shrink(
  model: Any,
  params: Any,
  masks: Any,
  *,
  structure: Structure | str | None = None,
  fields: Mapping[str, str] | None = None,
  links: Sequence[tuple[str, str | None]] | None = None,
) -> tuple[Any, dict[str, Any]]:
  """Smaller params and the model fields that describe them.

  Args:
    model: the `ZooModel` the params belong to.
    params: channel- or head-pruned params.
    masks: their bool masks.
    structure: `Channel(-1)` / `"channel"` (default) or `Heads(...)` / `"heads"` (sizes read
      from the model's `num_heads` / `head_dim`).
    fields: channels: `{producer kernel path: module field of its width}`; zoo models have
      defaults.
    links: channels: producer/consumer pairs; default: each producer feeds the next kernel.

  Returns:
    `(shrunk params, {module field: new value})`, e.g. `{"hidden": 64}` or
    `{"head_dim": 40, "layer_heads": (2, 2, 2, 2)}`.

  Raises:
    InvalidValueError: for a structure other than output channels or heads, or a model without the
      fields to describe the result.
  """
  from jaxshrink.models.configured import parse_model_source

  structure = _structure(model, structure)
  if isinstance(structure, Heads):
    small, kept, head_size = shrink_heads(params, masks, structure)
    return small, heads_config(kept, head_size)
  if not isinstance(structure, Channel) or structure.axis != -1:
    raise InvalidValueError(
      f"shrink needs structure 'channel' (whole output channels) or 'heads'; got "
      f"{getattr(structure, 'name', structure)!r}. Prune with one of those, or do not shrink."
    )
  base = parse_model_source(model.name)[0]
  fields = dict(fields or ZOO_FIELDS.get(base, {}))
  if not fields:
    raise InvalidValueError(
      f"shrink needs `fields` for model {model.name!r}: which module field holds each pruned "
      "layer's width, e.g. {'dense1/kernel': 'hidden1'}."
    )
  pruned = {p for p, m in flatten(masks).items() if np.ndim(m)}
  names = list(flatten(params))
  order = sorted(fields, key=names.index)
  if links is None:
    kernels = [p for p in names if p.endswith("kernel")]
    links = [(p, kernels[kernels.index(p) + 1]) for p in order if p in pruned]
  small, widths = shrink_params(params, masks, links)
  return small, {fields[p]: w for p, w in widths.items() if p in fields}


def shrink_model(
  model: Any,
  params: Any,
  masks: Any,
  *,
  structure: Structure | str | None = None,
  fields: Mapping[str, str] | None = None,
  links: Sequence[tuple[str, str | None]] | None = None,
) -> tuple[Any, Any]:
  """Smaller params and a `ZooModel` configured for them (see `shrink` for the arguments).

  Returns:
    `(shrunk params, shrunk ZooModel)`, params first like `shrink` and `shrink_params`; the
    model's name is its source with the new sizes, e.g. `"digits-cnn(channels2=16,
    hidden=64)"`, which `jaxshrink.models.load_model` accepts.
  """
  from jaxshrink.models.configured import configure_model

  small, config = shrink(model, params, masks, structure=structure, fields=fields, links=links)
  return small, configure_model(model, config)
