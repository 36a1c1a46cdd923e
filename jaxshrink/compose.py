"""How a stage treats the leaves an earlier stage compressed.

Stages chain: each one runs on the tree the previous ones left. For every kernel a stage
selects that is already an `Encoding`, this module decides one of three things:

- **decode and keep**: the stage works on the decoded values and keeps what the encoding
  promised. A pruned kernel (`bitmask`, `nm`) is quantized with its zeros exactly zero (RTN,
  AWQ and SmoothQuant map 0 to code 0; GPTQ keeps exact zeros), or pruned again with its old
  mask kept; a `cast` kernel is simply float.
- **work on the parts**: low-rank factors are quantized as factors (RTN, GPTQ).
- **refuse**: the combination would throw away the earlier stage's work (SVD factors of a
  sparse kernel are dense; re-quantizing codes compounds two roundings). The `UsageError`
  names both stages, the leaf, and the orders that work.

Calibration (`capture.collect`) runs the model on the compressed tree itself, decoded inside
the traced forward, so every calibrated method sees the activations of the model the earlier
stages left, not of the float one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxshrink.encoding import Encoding, encoding_name, is_encoding
from jaxshrink.errors import UsageError
from jaxshrink.tree import Rule, as_rule, flatten, map_with_path

# The stage kind that writes each encoding.
MADE_BY = {"bitmask": "prune", "nm": "prune", "qarray": "quantize", "lowrank": "factorize",
           "cast": "cast"}  # fmt: skip
PRUNED = ("bitmask", "nm")


class CompositionError(UsageError):
  """A stage cannot run on a kernel an earlier stage compressed, in that order."""


def made_by(leaf: Any) -> str:
  return MADE_BY.get(encoding_name(leaf), encoding_name(leaf))


def refuse(stage: str, path: str, leaf: Any, why: str, fix: str) -> CompositionError:
  earlier = made_by(leaf)
  return CompositionError(
    f"`{stage}` cannot run after `{earlier}` on `{path}` ({leaf.describe()}): {why}. {fix}"
  )


def selected_encodings(tree: Any, rule: Rule | str) -> dict[str, Encoding]:
  """`{path: encoding}` of the compressed leaves `rule` selects."""
  rule = as_rule(rule)
  return {
    p: leaf for p, leaf in flatten(tree).items() if is_encoding(leaf) and rule.matches(p, leaf)
  }


def decode_selected(
  tree: Any,
  rule: Rule | str,
  *,
  stage: str,
  decode: tuple[str, ...],
  refusals: Mapping[str, tuple[str, str]],
  keep: tuple[str, ...] = (),
) -> Any:
  """`tree` with the selected leaves of the `decode` encodings decoded to dense arrays.

  Args:
    tree: the pipeline's tree.
    rule: the stage's selection.
    stage: the stage's name, for the error.
    decode: encoding names the stage works on decoded (e.g. `("bitmask", "nm", "cast")`).
    refusals: encoding name -> `(why, fix)` of the refusal.
    keep: encoding names the stage handles itself (left as they are).

  Raises:
    CompositionError: a selected leaf's encoding is in neither `decode` nor `keep`.
  """
  out = {}
  for path, leaf in selected_encodings(tree, rule).items():
    name = encoding_name(leaf)
    if name in decode:
      out[path] = leaf.materialize()
    elif name not in keep:
      why, fix = refusals.get(
        name, ("it does not know that encoding", f"Exclude `{path}` from the stage's target.")
      )
      raise refuse(stage, path, leaf, why, fix)
  return map_with_path(lambda p, leaf: out.get(p, leaf), tree) if out else tree


def encoded_masks(tree: Any, rule: Rule | str) -> dict[str, jax.Array]:
  """`{path: bool keep mask}` of the selected pruned encodings (`bitmask`, `nm`), flat by path.

  The stages' view; users read masks in their tree's layout with `sparsity.pruned_masks`.
  """
  return {
    p: jnp.asarray(leaf.materialize() != 0) if not hasattr(leaf, "mask") else leaf.mask()
    for p, leaf in selected_encodings(tree, rule).items()
    if encoding_name(leaf) in PRUNED
  }


def frozen_zeros(masks: Mapping[str, Any]) -> optax.GradientTransformation:
  """An optax transformation that zeroes the updates of pruned weights: chained after an
  optimizer, training keeps every pruned weight exactly zero while the kept ones learn."""

  def update(updates, state, params=None):
    del params
    return keep_masks(updates, masks), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def keep_masks(tree: Any, masks: Mapping[str, Any]) -> Any:
  """Zeroes each masked leaf of a dense tree outside its mask (host-side, exact)."""
  if not masks:
    return tree
  return map_with_path(
    lambda p, w: jnp.where(np.asarray(masks[p]), w, jnp.zeros((), w.dtype)) if p in masks else w,
    tree,
  )


def check_zeros_kept(before: Mapping[str, jax.Array], after: Any) -> None:
  """Asserts a stage kept every pruned weight exactly zero (a bug guard, not a user error)."""
  flat = flatten(after)
  for path, mask in before.items():
    dense = flat[path].materialize() if is_encoding(flat[path]) else flat[path]
    if bool(jnp.any(jnp.where(mask, 0.0, jnp.abs(dense)) != 0)):
      raise AssertionError(f"`{path}` lost pruned zeros while being compressed further.")


def without(rule: Rule | str, paths: Iterable[str]) -> Rule:
  """`rule` less the leaves at `paths` (e.g. the factorized kernels a stage handles itself)."""
  rule = as_rule(rule)
  paths = [re.escape(p) for p in paths]
  if not paths:
    return rule
  exclude = "|".join(([f"(?:{rule.exclude})"] if rule.exclude else []) + paths)
  return dataclasses.replace(rule, exclude=exclude)


def uncast(tree: Any) -> tuple[Any, dict[str, tuple[tuple[int, ...], str]]]:
  """Decodes every `cast` leaf: bf16/fp16 storage is exact to decode, so a later stage sees
  float leaves (trains, prunes, quantizes them). Returns the tree and `{path: (shape, storage
  dtype)}` for `recast`."""
  casts = {
    p: (tuple(leaf.shape), np.dtype(leaf.values.dtype).name)
    for p, leaf in flatten(tree).items()
    if encoding_name(leaf) == "cast"
  }
  if not casts:
    return tree, casts
  decoded = map_with_path(lambda p, leaf: leaf.materialize() if p in casts else leaf, tree)
  return decoded, casts


def recast(tree: Any, casts: Mapping[str, tuple[tuple[int, ...], str]]) -> Any:
  """Stores again, in their storage dtype, the `uncast` leaves a stage left plain float with
  their shape; the ones it compressed (or reshaped, or a student replaced) stay as they are."""
  if not casts:
    return tree
  from jaxshrink.cast import Cast

  def visit(path: str, leaf: Any) -> Any:
    if path not in casts or is_encoding(leaf) or not hasattr(leaf, "dtype"):
      return leaf
    shape, storage = casts[path]
    if tuple(leaf.shape) != shape or not jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf
    return Cast.encode(jnp.asarray(leaf), storage, path=path)

  return map_with_path(visit, tree)
