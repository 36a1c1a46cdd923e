"""Structured surgery: channel-pruned layers become genuinely smaller layers.

After `Channel(-1)` pruning zeroes whole output channels (kernel columns and
their bias entries), `shrink_params` drops them from the producer and slices
the matching input rows of the layer that consumes them: a Dense 256 -> 64
features, the next Dense's kernel 256 -> 64 rows; a conv's filters, the next
conv's input channels; a conv feeding a flatten + Dense, the Dense rows of
those channels. The shrunk model computes what the masked model computes
(a pruned channel is exactly zero after its bias and a zero-preserving
activation such as ReLU or GELU), with smaller arrays.

`shrink_model` also returns the matching model configuration for zoo models
(or for any model given `fields`): a `ZooModel` whose module is rebuilt with
the new widths.

>>> small_model, small_params = shrink_model(model, pruned, masks)
>>> small_params["dense1"]["kernel"].shape      # (1024, 64) instead of (1024, 128)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

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
    raise ValueError(
      f"`{path}` has no channel mask (shape {mask.shape}); prune it with structure 'channel'."
    )
  return np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0))


def _slice_inputs(kernel: np.ndarray, keep: np.ndarray, channels: int, path: str) -> np.ndarray:
  rows = kernel.shape[-2]
  if rows == channels:
    return np.take(kernel, keep, axis=-2)
  if rows % channels:
    raise ValueError(
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
      raise ValueError(f"`{producer}` was not pruned: no channel mask. Add it to the rule.")
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


def shrink_model(
  model: Any,
  params: Any,
  masks: Any,
  *,
  fields: Mapping[str, str] | None = None,
  links: Sequence[tuple[str, str | None]] | None = None,
) -> tuple[Any, Any]:
  """Smaller params and a `ZooModel` configured for them.

  Args:
    model: a `jaxshrink.models.ZooModel` whose module takes the widths as fields
      (linen) or constructor keywords (nnx).
    params: channel-pruned params.
    masks: their bool masks.
    fields: `{producer kernel path: module field of its width}`; zoo models have defaults.
    links: producer/consumer pairs; default: consecutive entries of `fields`.

  Returns:
    `(shrunk ZooModel, shrunk params)`.
  """
  from jaxshrink.models.base import linen_functions, nnx_functions

  fields = dict(fields or ZOO_FIELDS.get(model.name, {}))
  if not fields:
    raise ValueError(
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
  config = {fields[p]: w for p, w in widths.items() if p in fields}
  if model.framework == "linen":
    module = model.module.clone(**config)
    init, apply = linen_functions(module, model.input_shape, model.input_dtype)
  else:
    module = functools.partial(model.module, **config)
    init, apply = nnx_functions(module)
  small_model = dataclasses.replace(
    model, name=f"{model.name}-shrunk", init=init, apply=apply, module=module
  )
  return small_model, small
