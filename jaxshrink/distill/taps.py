"""Taps: a zoo model's apply that also returns the outputs of chosen submodules.

Feature distillation (hidden-state matching, FitNets hints) needs intermediate outputs, but
zoo models return only their final output. `tapped_apply` wraps a model without touching its
code: for NNX it rebuilds the module from the params and swaps each tapped submodule for a
thin wrapper that records its output; for Linen it uses `capture_intermediates`. The result
follows the `DistillLoss` contract, `{"logits": output, <tap name>: submodule output}`, so
`FeaturePair`s match tapped outputs of a student and a teacher by name.

>>> apply = tapped_apply(get_model("minilm-l6"), {"layer_5": "encoder/layer_5"}, pad_id=0)
>>> out = apply(params, ids)                    # ids (B, T) int32
>>> out["logits"].shape, out["layer_5"].shape   # embeddings and the last layer's hidden states
((B, 384), (B, T, 384))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxshrink.errors import InvalidTypeError, InvalidValueError, JaxshrinkError

RESERVED_NAME = "logits"


class _Recorder:
  """Calls a submodule and stores its output in `sink[name]`; stands in for the submodule."""

  def __init__(self, inner: Any, sink: dict[str, Any], name: str):
    self.inner, self.sink, self.name = inner, sink, name

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    out = self.inner(*args, **kwargs)
    self.sink[self.name] = out
    return out


def _check_taps(taps: Mapping[str, str], who: str) -> dict[str, tuple[str, ...]]:
  if not isinstance(taps, Mapping):
    raise InvalidTypeError(f"`taps` of the {who} must map names to module paths; got {type(taps)}.")
  out = {}
  for name, path in taps.items():
    if name == RESERVED_NAME:
      raise InvalidValueError(
        f"tap name `{RESERVED_NAME}` is reserved for the model's output; rename the tap of "
        f"`{path}` in the {who}."
      )
    if not isinstance(path, str) or not path.strip("/"):
      raise InvalidValueError(
        f"tap `{name}` of the {who} needs a module path such as 'encoder/layer_2'; got {path!r}."
      )
    out[name] = tuple(path.strip("/").split("/"))
  return out


def _missing(path: tuple[str, ...], who: str, children: list[str]) -> JaxshrinkError:
  return JaxshrinkError(
    f"the {who} has no submodule `{'/'.join(path)}` to tap; submodules at that level: "
    f"{', '.join(sorted(children)) or 'none'}. Use a module path from the param tree without "
    "the final param name (e.g. `encoder/layer_2` for `encoder/layer_2/output/kernel`)."
  )


def _nnx_submodule(root: nnx.Module, path: tuple[str, ...], who: str) -> tuple[Any, str]:
  """`(parent, attribute)` of the submodule at `path`."""
  parent = root
  for depth, part in enumerate(path):
    child = getattr(parent, part, None)
    if not isinstance(child, nnx.Module):
      names = [k for k, v in vars(parent).items() if isinstance(v, nnx.Module)]
      raise _missing(path[: depth + 1], who, names)
    if depth == len(path) - 1:
      return parent, part
    parent = child
  raise _missing(path, who, [])  # empty path; rejected by _check_taps already


def _mask_tokens(value: jax.Array, tokens: jax.Array, pad_id: int | None) -> jax.Array:
  """Zeroes the padding positions of a `(B, T, ...)` feature, so they never add to a loss."""
  if pad_id is None or tokens.ndim != 2 or value.shape[:2] != tokens.shape:
    return value
  keep = (tokens != pad_id).reshape(tokens.shape + (1,) * (value.ndim - 2))
  return jnp.where(keep, value, jnp.zeros((), value.dtype))


def tapped_apply(
  model: Any, taps: Mapping[str, str], *, pad_id: int | None = None, who: str = "model"
) -> Callable[[Any, Any], dict[str, jax.Array]]:
  """`apply(params, x) -> {"logits": output, name: submodule output}` for a zoo model.

  Args:
    model: a `jaxshrink.models.ZooModel` (NNX or Linen).
    taps: `{name: module path}`, e.g. `{"hidden_1": "encoder/layer_1"}`; each submodule's
      `__call__` output is returned under its name.
    pad_id: for token-id inputs `(B, T)`: positions holding this id are zeroed in every
      `(B, T, ...)` tapped output, so padding never counts in a feature loss. None keeps all.
    who: "student" or "teacher", for error messages.

  Returns:
    A pure apply function over the model's param tree, usable under `jit` and `grad`.

  Raises:
    JaxshrinkError: a path names no submodule (raised on the first call); ValueError: a
      reserved or empty tap.
  """
  paths = _check_taps(taps, who)
  if model.framework == "nnx":
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model.module(rngs=nnx.Rngs(0))))

    def apply_nnx(params: Any, x: Any) -> dict[str, jax.Array]:
      state = jax.tree.map(lambda leaf: leaf, abstract)
      nnx.replace_by_pure_dict(state, params)
      module = nnx.merge(graphdef, state)
      sink: dict[str, Any] = {}
      for name, path in paths.items():
        parent, attr = _nnx_submodule(module, path, who)
        # Plain attribute swap on this call's fresh module; the model's own code is untouched.
        object.__setattr__(parent, attr, _Recorder(getattr(parent, attr), sink, name))
      out = module(x)
      return _collect(out, sink, paths, x, pad_id, who)

    return apply_nnx
  if not isinstance(model.module, nn.Module):
    raise InvalidTypeError(
      f"the {who} must be an NNX or Linen zoo model; got {type(model.module)}."
    )
  module = model.module
  wanted = set(paths.values())

  def apply_linen(params: Any, x: Any) -> dict[str, jax.Array]:
    out, state = module.apply(
      {"params": params},
      x,
      capture_intermediates=lambda mdl, method: method == "__call__" and mdl.path in wanted,
      mutable=["intermediates"],
    )
    sink = {}
    for name, path in paths.items():
      node = state.get("intermediates", {})
      for part in path:
        node = node.get(part, {}) if isinstance(node, Mapping) else {}
      if "__call__" in node:
        sink[name] = node["__call__"][0]
    return _collect(out, sink, paths, x, pad_id, who)

  return apply_linen


def _collect(out, sink, paths, x, pad_id, who) -> dict[str, jax.Array]:
  result = {RESERVED_NAME: out}
  for name, path in paths.items():
    if name not in sink:
      raise _missing(path, who, [])
    value = sink[name]
    if not isinstance(value, jax.Array):
      raise JaxshrinkError(
        f"tap `{name}` (`{'/'.join(path)}`) of the {who} returned {type(value).__name__}, not "
        "an array; tap a submodule whose call returns one array."
      )
    result[name] = _mask_tokens(value, jnp.asarray(x), pad_id)
  return result
