"""Allocation: how a sparsity target is spread over layers, and the `Pruner` that builds masks.

- `uniform`: every layer (unit) gets the target sparsity.
- `global`: one ranking over all layers; each layer's group scores are first
  divided by their RMS so layers with large weights do not keep everything.
- `erk`: Erdős–Rényi-Kernel (Evci et al., "Rigging the Lottery", 2020): a
  layer's density scales with `sum(shape) / prod(shape)`, so small layers stay
  denser, with the overall sparsity equal to the target.
- `overrides`: `{regex: sparsity}` fixes the sparsity of matching layers (0.0
  keeps a layer dense); `rule.exclude` leaves layers out entirely.

>>> pruner = Pruner(".*kernel", sparsity=0.9, allocation="erk")
>>> masks = pruner.masks(params)                 # bool, same structure as params
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.sparsity.criteria import check_criterion, score_leaf
from jaxshrink.sparsity.structures import (
  NM,
  Structure,
  Unit,
  keep_top,
  keep_top_many,
  nm_mask,
  parse_structure,
)
from jaxshrink.tree import Rule, as_rule, flatten, map_with_path, select

ALLOCATIONS = ("uniform", "global", "erk")


def check_sparsity(value: Any, what: str = "sparsity") -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise TypeError(f"`{what}` must be a number in [0, 1); got {value!r}.")
  if not 0.0 <= float(value) < 1.0:
    raise ValueError(
      f"`{what}` must be in [0, 1) (the fraction of weights set to zero); got {value}. "
      "Use e.g. 0.9 for 90% zeros."
    )
  return float(value)


def erk_sparsities(shapes: dict[str, tuple[int, ...]], sparsity: float) -> dict[str, float]:
  """Per-layer sparsities whose weighted mean is `sparsity`, density ∝ sum(shape)/prod(shape)."""
  sizes = {p: int(np.prod(s)) for p, s in shapes.items()}
  raw = {p: sum(s) / sizes[p] for p, s in shapes.items()}
  keep_total = (1.0 - sparsity) * sum(sizes.values())
  dense: set[str] = set()
  while True:
    free = [p for p in shapes if p not in dense]
    budget = keep_total - sum(sizes[p] for p in dense)
    denom = sum(raw[p] * sizes[p] for p in free)
    eps = budget / denom if denom else 0.0
    over = [p for p in free if eps * raw[p] > 1.0]
    if not over:
      break
    dense.update(over)
  return {p: 0.0 if p in dense else float(1.0 - eps * raw[p]) for p in shapes}


@dataclasses.dataclass(frozen=True)
class Pruner:
  """What to prune and how: the one object every pruning method takes.

  Attributes:
    rule: which leaves (a `Rule` or an include regex).
    sparsity: final fraction of zeros in [0, 1) (N:M structures fix it to 1 - N/M).
    structure: a `Structure` or its recipe string (`unstructured`, `"2:4"`, `channel`, ...).
    criterion: `magnitude`, `random`, `saliency` or `wanda`.
    allocation: `uniform`, `global` or `erk`.
    overrides: `{regex: sparsity}` per-layer sparsities (matched on the unit name).
  """

  rule: Rule | str
  sparsity: float = 0.5
  structure: Structure | str = "unstructured"
  criterion: str = "magnitude"
  allocation: str = "uniform"
  overrides: Mapping[str, float] | tuple = ()

  def __post_init__(self):
    object.__setattr__(self, "rule", as_rule(self.rule))
    object.__setattr__(self, "structure", parse_structure(self.structure))
    check_criterion(self.criterion)
    if self.allocation not in ALLOCATIONS:
      raise ValueError(
        f"Unknown allocation {self.allocation!r}; expected one of {list(ALLOCATIONS)}."
      )
    sparsity = self.structure.sparsity if isinstance(self.structure, NM) else self.sparsity
    object.__setattr__(self, "sparsity", check_sparsity(sparsity))
    items = self.overrides.items() if isinstance(self.overrides, Mapping) else self.overrides
    object.__setattr__(
      self, "overrides", tuple((str(k), check_sparsity(v, f"overrides[{k!r}]")) for k, v in items)
    )

  def units(self, params: Any) -> tuple[list[Unit], dict[str, tuple[int, ...]]]:
    """The structure's units over the selected leaves, and every leaf's shape."""
    flat = flatten(params)
    all_shapes = {p: tuple(leaf.shape) for p, leaf in flat.items()}
    selected = {p: all_shapes[p] for p in select(params, self.rule)}
    return self.structure.units(selected, all_shapes), all_shapes

  def unit_sparsities(self, units: list[Unit], shapes: dict) -> dict[str, float | None]:
    """Final sparsity per unit; None marks units ranked together by `global`."""
    fixed = {}
    for unit in units:
      for pattern, value in self.overrides:
        if re.fullmatch(pattern, unit.name):
          fixed[unit.name] = value
          break
    pool = [u for u in units if u.name not in fixed]
    if self.allocation == "uniform":
      fixed.update({u.name: self.sparsity for u in pool})
    elif self.allocation == "erk":
      fixed.update(erk_sparsities({u.name: shapes[u.members[0][0]] for u in pool}, self.sparsity))
    else:
      fixed.update({u.name: None for u in pool})
    return fixed

  def dense_masks(self, params: Any) -> Any:
    """All-True masks: full-shape for every leaf this pruner may prune, `()` elsewhere."""
    units, shapes = self.units(params)
    paths = {p for u in units for p, _ in u.members + u.followers}
    return map_with_path(lambda p, leaf: jnp.ones(shapes[p] if p in paths else (), bool), params)

  def masks(
    self,
    params: Any,
    fraction: Any = 1.0,
    *,
    grads: Any = None,
    input_norms: Mapping[str, jax.Array] | None = None,
    contract_dims: Mapping[str, tuple[int, ...]] | None = None,
    key: jax.Array | None = None,
  ) -> Any:
    """Bool masks (True = keep), same structure as `params`; works under `jit`.

    Leaves the rule does not select get a scalar `True`.

    Args:
      params: param tree (dict, linen variables or `nnx.State`).
      fraction: share of the final sparsity to apply now (a schedule's output, may be traced).
      grads: gradient tree, for the `saliency` criterion.
      input_norms: `{path: (K,) norms}` for the `wanda` criterion.
      contract_dims: `{path: contracting dims}` matching `input_norms` (default `(0,)`).
      key: PRNG key for the `random` criterion.
    """
    units, shapes = self.units(params)
    flat = flatten(params)
    flat_grads = flatten(grads) if grads is not None else {}
    fraction = jnp.asarray(fraction, jnp.float32)
    scores = {}
    for index, unit in enumerate(units):
      for path, _ in unit.members:
        scores[path] = score_leaf(
          self.criterion,
          flat[path],
          grad=flat_grads.get(path),
          input_norm=None if input_norms is None else input_norms.get(path),
          contract_dims=tuple((contract_dims or {}).get(path, (0,))),
          key=None if key is None else jax.random.fold_in(key, index),
          path=path,
        )
    out: dict[str, jax.Array] = {}
    if isinstance(self.structure, NM):
      for unit in units:
        path = unit.members[0][0]
        keep = nm_mask(scores[path], self.structure.n, self.structure.m, self.structure.axis)
        override = dict(self.overrides)
        if any(re.fullmatch(p, unit.name) and v == 0.0 for p, v in override.items()):
          keep = jnp.ones_like(keep)
        out[path] = jnp.where(fraction > 0, keep, True)
    else:
      sparsities = self.unit_sparsities(units, shapes)
      pool = [u for u in units if sparsities[u.name] is None]
      for unit in units:
        if sparsities[unit.name] is None:
          continue
        group = self.structure.group_scores(unit, scores)
        pruned = jnp.round(sparsities[unit.name] * fraction * unit.num_groups).astype(jnp.int32)
        out.update(self.structure.expand(unit, keep_top(group, unit.num_groups - pruned), shapes))
      if pool:
        groups = [self.structure.group_scores(u, scores) for u in pool]
        normed = [g / (jnp.sqrt(jnp.mean(g * g)) + 1e-12) for g in groups]
        total = sum(u.num_groups for u in pool)
        pruned = jnp.round(self.sparsity * fraction * total).astype(jnp.int32)
        for unit, keep in zip(pool, keep_top_many(normed, total - pruned), strict=True):
          out.update(self.structure.expand(unit, keep, shapes))
    return map_with_path(lambda path, leaf: out.get(path, jnp.ones((), bool)), params)


def check_masks(params: Any, masks: Any) -> None:
  """Raises a `ValueError` naming the first leaf where `masks` does not fit `params`."""
  flat_p, flat_m = flatten(params), flatten(masks)
  if set(flat_p) != set(flat_m):
    missing = sorted(set(flat_p) - set(flat_m))[:5]
    extra = sorted(set(flat_m) - set(flat_p))[:5]
    raise ValueError(
      f"The mask tree does not match the params: missing masks for {missing}, masks for "
      f"unknown leaves {extra}. Build masks with Pruner.masks(params) for these params."
    )
  for path, mask in flat_m.items():
    shape = tuple(flat_p[path].shape)
    if jnp.dtype(mask.dtype) != jnp.bool_ or tuple(mask.shape) not in (shape, ()):
      raise ValueError(
        f"Mask for `{path}` must be bool with shape {shape} (or () for unpruned leaves); got "
        f"{jnp.dtype(mask.dtype).name} {tuple(mask.shape)}. Masks are bool, never float."
      )


def apply_masks(params: Any, masks: Any) -> Any:
  """Zeroes pruned weights: `where(mask, w, 0)` leaf by leaf."""
  check_masks(params, masks)
  return jax.tree.map(lambda w, m: jnp.where(m, w, jnp.zeros((), w.dtype)), params, masks)


def mask_sparsity(masks: Any) -> dict[str, float]:
  """Fraction of False per pruned leaf (scalar masks are skipped)."""
  return {
    p: float(1.0 - jnp.mean(m.astype(jnp.float32))) for p, m in flatten(masks).items() if m.ndim
  }
