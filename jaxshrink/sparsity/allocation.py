"""Allocation: how a sparsity target is spread over layers, and the `Pruner` that builds masks.

- `uniform`: every layer (unit) gets the target sparsity.
- `global`: one ranking over all layers; each layer's group scores are first
  divided by their RMS so layers with large weights do not keep everything.
- `erk`: Erdős–Rényi-Kernel (Evci et al., "Rigging the Lottery", 2020): a
  layer's density scales with `sum(shape) / prod(shape)`, so small layers stay
  denser, with the overall sparsity equal to the target.
- `overrides`: `{regex: sparsity}` (or `[(regex | Rule, sparsity), ...]`) fixes the sparsity
  of matching layers (0.0 keeps a layer dense). The list is first-match, as every rule list in
  jaxshrink: the first override matching a layer decides, and an override that selects no
  layer (or only layers an earlier one took) is a `NoMatchError`. `rule.exclude` leaves
  layers out entirely.
- `keep_dense_below`: selected leaves with fewer weights stay dense (a first conv's 3x3x1x32
  kernel, a 10-class head) and the other leaves prune more, so the total over the selected
  leaves is still `sparsity` (N:M fixes each pruned leaf's sparsity, so there the total is
  over the pruned leaves). `Pruner.report` says what was kept dense and why.

>>> pruner = Pruner(".*kernel", sparsity=0.9, allocation="erk")
>>> masks = pruner.masks(params)                 # bool, same structure as params
>>> pruner = Pruner(".*kernel", 0.9, keep_dense_below=4096)       # digits-cnn's params
>>> pruner.report(params, pruner.masks(params))["kept_dense"]
{'conv1/kernel': 'kept dense (288 weights < keep_dense_below 4096)', ...}
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.encoding import materialize
from jaxshrink.errors import InvalidTypeError, InvalidValueError, NoMatchError
from jaxshrink.model import accepts_models
from jaxshrink.quant.qarray import default_contract_dims
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

# The `prune` stage's `keep_dense_below`: every kernel of a transformer is larger, while a
# first conv (digits-cnn's 288 weights) or a small classifier head (1,280) loses accuracy
# out of proportion to the bytes its pruning saves.
DEFAULT_KEEP_DENSE_BELOW = 4096


class _Shaped(NamedTuple):
  """A leaf stand-in for `Rule.matches`, which reads only the shape."""

  shape: tuple[int, ...]


def check_sparsity(value: Any, what: str = "sparsity") -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise InvalidTypeError(f"`{what}` must be a number in [0, 1); got {value!r}.")
  if not 0.0 <= float(value) < 1.0:
    raise InvalidValueError(
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
    overrides: per-layer sparsities, `{regex: sparsity}` or `[(regex | Rule, sparsity)]`,
      matched on the unit name (the kernel path; the attention prefix for heads); the first
      matching override decides.
    keep_dense_below: selected leaves with fewer weights stay dense; the others prune more so
      the total over the selected leaves is `sparsity` (not for N:M, whose pattern is fixed).
  """

  rule: Rule | str
  sparsity: float = 0.5
  structure: Structure | str = "unstructured"
  criterion: str = "magnitude"
  allocation: str = "uniform"
  overrides: Mapping[str, float] | Sequence[tuple[str | Rule, float]] = ()
  keep_dense_below: int = 0

  def __post_init__(self):
    object.__setattr__(self, "rule", as_rule(self.rule))
    object.__setattr__(self, "structure", parse_structure(self.structure))
    check_criterion(self.criterion)
    if self.allocation not in ALLOCATIONS:
      raise InvalidValueError(
        f"Unknown allocation {self.allocation!r}; expected one of {list(ALLOCATIONS)}."
      )
    sparsity = self.structure.sparsity if isinstance(self.structure, NM) else self.sparsity
    object.__setattr__(self, "sparsity", check_sparsity(sparsity))
    items = self.overrides.items() if isinstance(self.overrides, Mapping) else self.overrides
    parsed = []
    for entry in items:
      if not isinstance(entry, tuple) or len(entry) != 2:
        raise InvalidTypeError(
          f"`overrides` of Pruner must be {{regex: sparsity}} or [(regex | Rule, sparsity)]; got "
          f"the entry {entry!r}."
        )
      key, value = entry
      if isinstance(key, str):
        Rule(include=key)  # refuses a bad regex here, naming it
      elif not isinstance(key, Rule):
        raise InvalidTypeError(
          f"An override of Pruner is matched by a regex or a Rule; got {type(key).__name__}."
        )
      parsed.append((key, check_sparsity(value, f"overrides[{key!r}]")))
    object.__setattr__(self, "overrides", tuple(parsed))
    below = self.keep_dense_below
    if isinstance(below, bool) or not isinstance(below, int):
      raise InvalidTypeError(f"`keep_dense_below` must be an int (a weight count); got {below!r}.")
    if below < 0:
      raise InvalidValueError(
        f"`keep_dense_below` must be a non-negative weight count; got {below}. Use 0 to "
        "prune layers of every size."
      )

  @property
  def pruned_rule(self) -> Rule:
    """`rule` without the leaves `keep_dense_below` keeps dense: the leaves to encode sparse."""
    return dataclasses.replace(self.rule, min_size=max(self.rule.min_size, self.keep_dense_below))

  def small_leaves(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """`{path: size}` of the selected leaves below `keep_dense_below` weights (kept dense).

    Args:
      shapes: every leaf's shape, `{path: shape}`.
    """
    out = {}
    for path, shape in shapes.items():
      size = int(np.prod(shape, dtype=np.int64))
      if size < self.keep_dense_below and self.rule.matches(path, _Shaped(shape)):
        out[path] = size
    return out

  def target_sparsity(self, shapes: Mapping[str, tuple[int, ...]]) -> float:
    """The sparsity the pruned leaves need so that the selected leaves reach `sparsity`.

    Equal to `sparsity` unless `keep_dense_below` keeps some selected leaves dense; then
    `sparsity * selected / (selected - kept)` weights.
    """
    small = self.small_leaves(shapes)
    if not small or isinstance(self.structure, NM):
      return self.sparsity
    total = sum(
      int(np.prod(s, dtype=np.int64)) for p, s in shapes.items() if self.rule.matches(p, _Shaped(s))
    )
    value = self.sparsity * total / (total - sum(small.values()))
    if value >= 1.0:
      raise InvalidValueError(
        f"`sparsity` {self.sparsity} over the selected leaves needs {value:.1%} of the leaves "
        f"with >= keep_dense_below={self.keep_dense_below} weights, but at most 100% can be "
        f"pruned ({len(small)} smaller leaves kept dense). Lower `keep_dense_below` (0 prunes "
        "every selected leaf) or `sparsity`."
      )
    return value

  def units(self, params: Any) -> tuple[list[Unit], dict[str, tuple[int, ...]]]:
    """The structure's units over the selected leaves, and every leaf's shape."""
    flat = flatten(params)
    all_shapes = {p: tuple(leaf.shape) for p, leaf in flat.items()}
    small = self.small_leaves(all_shapes)
    selected = {p: all_shapes[p] for p in select(params, self.rule) if p not in small}
    if not selected:
      raise InvalidValueError(
        f"Every leaf selected by {self.rule.describe()} has fewer than "
        f"keep_dense_below={self.keep_dense_below} weights ({sorted(small)[:5]}), so nothing "
        "would be pruned. Set `keep_dense_below` lower (0 prunes every selected leaf)."
      )
    units = self.structure.units(selected, all_shapes)
    self._check_overrides(units, all_shapes, small)
    return units, all_shapes

  def _override_matches(self, key: str | Rule, name: str, shape: tuple[int, ...]) -> bool:
    if isinstance(key, Rule):
      return key.matches(name, _Shaped(shape))
    return re.fullmatch(key, name) is not None

  def override_for(self, unit: Unit, shapes: Mapping[str, tuple[int, ...]]) -> tuple | None:
    """The first `(pattern, sparsity)` override matching `unit`, or None."""
    shape = shapes[unit.members[0][0]]
    for key, value in self.overrides:
      if self._override_matches(key, unit.name, shape):
        return key, value
    return None

  def _check_overrides(self, units: list[Unit], shapes: Mapping, small: Mapping) -> None:
    """Raises `NoMatchError` for an override that selects no unit (first match wins)."""
    names = {u.name: shapes[u.members[0][0]] for u in units}
    names.update({p: shapes[p] for p in small})  # kept dense anyway; an override may name them
    taken: set[str] = set()
    for index, (key, _) in enumerate(self.overrides):
      hits = [n for n, shape in names.items() if self._override_matches(key, n, shape)]
      shown = _shown(key)
      if not hits:
        raise NoMatchError(
          f"`overrides[{index}]` {shown} of Pruner matches no pruned layer; the layers are "
          f"{', '.join(list(names)[:20])}. Fix the regex (it must match the whole name)."
        )
      if all(n in taken for n in hits):
        raise NoMatchError(
          f"`overrides[{index}]` {shown} of Pruner selects nothing: every layer it matches "
          f"({', '.join(hits[:3])}) is taken by an earlier override. Overrides are "
          "first-match: put the more specific one first."
        )
      taken.update(hits)

  def unit_sparsities(self, units: list[Unit], shapes: dict) -> dict[str, float | None]:
    """Final sparsity per unit; None marks units ranked together by `global`."""
    fixed = {}
    for unit in units:
      override = self.override_for(unit, shapes)
      if override is not None:
        fixed[unit.name] = override[1]
    pool = [u for u in units if u.name not in fixed]
    target = self.target_sparsity(shapes)
    if self.allocation == "uniform":
      fixed.update({u.name: target for u in pool})
    elif self.allocation == "erk":
      fixed.update(erk_sparsities({u.name: shapes[u.members[0][0]] for u in pool}, target))
    else:
      fixed.update({u.name: None for u in pool})
    return fixed

  def report(self, params: Any, masks: Any) -> dict[str, Any]:
    """What was pruned and what was left alone, JSON-ready (the `prune` stage logs it).

    Args:
      params: the param tree the masks were built for (only shapes are read).
      masks: this pruner's masks (`Pruner.masks`, `masks_of(state)`, a method's masks).

    Returns:
      `{"requested": sparsity, "sparsity": zeros over the selected leaves,
      "pruned_leaves_sparsity": zeros over the leaves that were pruned, "layers":
      {path: sparsity}, "kept_dense": {path: reason}}`. `kept_dense` names the selected
      leaves kept dense (by `keep_dense_below`, an override of 0.0 or the allocation) and
      the leaves the target regex matches but `exclude` or `min_size` leaves alone.
    """
    flat = flatten(params)
    shapes = {p: tuple(leaf.shape) for p, leaf in flat.items()}
    sizes = {p: int(np.prod(s, dtype=np.int64)) for p, s in shapes.items()}
    flat_masks = flatten(masks)
    selected = [p for p, s in shapes.items() if self.rule.matches(p, _Shaped(s))]
    layers = {p: _mask_sparsity(flat_masks.get(p)) for p in selected}
    kept: dict[str, str] = {}
    rule = self.rule
    for path, shape in shapes.items():
      if path in layers or re.fullmatch(rule.include, path) is None or len(shape) < rule.min_ndim:
        continue
      if rule.exclude is not None and re.fullmatch(rule.exclude, path):
        kept[path] = f"left alone (matches exclude {rule.exclude!r})"
      else:
        kept[path] = f"left alone ({sizes[path]} weights < min_size {rule.min_size})"
    small = self.small_leaves(shapes)
    below = f"keep_dense_below {self.keep_dense_below}"
    units = {p: unit for unit in self.units(params)[0] for p, _ in unit.members}
    for path in selected:
      if path in small:
        kept[path] = f"kept dense ({small[path]} weights < {below})"
        continue
      if layers[path] > 0.0:
        continue
      unit = units.get(path)
      override = None if unit is None else self.override_for(unit, shapes)
      if override is not None and override[1] == 0.0:
        kept[path] = f"kept dense (overrides {_shown(override[0])}: 0.0)"
      elif self.allocation == "erk" and not isinstance(self.structure, NM):
        kept[path] = "kept dense (erk: a layer this small would need a density above 1)"
      else:
        kept[path] = f"kept dense ({self.allocation} allocation pruned none of its weights)"
    total = sum(sizes[p] for p in selected)
    zeros = sum(layers[p] * sizes[p] for p in selected)
    pruned = [p for p in selected if layers[p] > 0.0]
    pruned_total = sum(sizes[p] for p in pruned)
    return {
      "requested": self.sparsity,
      "sparsity": round(zeros / max(total, 1), 6),
      "pruned_leaves_sparsity": round(
        sum(layers[p] * sizes[p] for p in pruned) / max(pruned_total, 1), 6
      ),
      "layers": {p: round(v, 6) for p, v in layers.items()},
      "kept_dense": kept,
    }

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
      contract_dims: `{path: contracting dims}` matching `input_norms` (default: every axis
        but the last, `jaxshrink.quant.qarray.default_contract_dims`).
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
          contract_dims=tuple(
            (contract_dims or {}).get(path) or default_contract_dims(shapes[path])
          ),
          key=None if key is None else jax.random.fold_in(key, index),
          path=path,
        )
    out: dict[str, jax.Array] = {}
    if isinstance(self.structure, NM):
      for unit in units:
        path = unit.members[0][0]
        keep = nm_mask(scores[path], self.structure.n, self.structure.m, self.structure.axis)
        override = self.override_for(unit, shapes)
        if override is not None and override[1] == 0.0:  # N:M's sparsity is fixed: only 0.0
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
        target = self.target_sparsity(shapes)
        pruned = jnp.round(target * fraction * total).astype(jnp.int32)
        for unit, keep in zip(pool, keep_top_many(normed, total - pruned), strict=True):
          out.update(self.structure.expand(unit, keep, shapes))
    return map_with_path(lambda path, leaf: out.get(path, jnp.ones((), bool)), params)


def _shown(key: str | Rule) -> str:
  """An override's pattern as messages and reports show it."""
  return key.describe() if isinstance(key, Rule) else repr(key)


def _mask_sparsity(mask: Any) -> float:
  if mask is None or not np.ndim(mask):
    return 0.0 if mask is None or bool(mask) else 1.0
  return float(1.0 - np.mean(np.asarray(jax.device_get(mask), dtype=np.float32)))


def check_masks(params: Any, masks: Any) -> None:
  """Raises a `ValueError` naming the first leaf where `masks` does not fit `params`."""
  flat_p, flat_m = flatten(params), flatten(masks)
  if set(flat_p) != set(flat_m):
    missing = sorted(set(flat_p) - set(flat_m))[:5]
    extra = sorted(set(flat_m) - set(flat_p))[:5]
    raise InvalidValueError(
      f"The mask tree does not match the params: missing masks for {missing}, masks for "
      f"unknown leaves {extra}. Build masks with Pruner.masks(params) for these params."
    )
  for path, mask in flat_m.items():
    shape = tuple(flat_p[path].shape)
    if jnp.dtype(mask.dtype) != jnp.bool_ or tuple(mask.shape) not in (shape, ()):
      raise InvalidValueError(
        f"Mask for `{path}` must be bool with shape {shape} (or () for unpruned leaves); got "
        f"{jnp.dtype(mask.dtype).name} {tuple(mask.shape)}. Masks are bool, never float."
      )


def apply_masks(params: Any, masks: Any) -> Any:
  """Zeroes pruned weights: `where(mask, w, 0)` leaf by leaf.

  A leaf whose mask is a concrete scalar `True` (not pruned) comes back as it is, not copied:
  sequential pruning masks one block at a time, and copying every other leaf per block grew
  MiniLM's peak memory by the model's size per block.
  """
  check_masks(params, masks)

  def masked(w, m):
    if np.ndim(m) == 0 and not isinstance(m, jax.core.Tracer) and bool(m):
      return jnp.asarray(w)
    return jnp.where(m, w, jnp.zeros((), w.dtype))

  return jax.tree.map(masked, params, masks)


@accepts_models(result="as_is")
def pruned_masks(tree: Any, pruner: Pruner | Rule | str) -> Any:
  """The bool masks (True = kept) of a pruned tree, read off its zeros.

  `oneshot_prune`, `wanda` and `sparsegpt` return only the pruned tree; this gives the masks
  they applied, in `Pruner.masks`' layout, for `pruning(..., masks=...)`,
  `encode_sparse(..., masks=...)` and `shrink_params`: a full-shape mask on every leaf the
  pruner prunes and a scalar `True` on every other leaf. With a `Pruner` the structure's
  groups decide: a channel or head is kept while any of its weights is nonzero, and its bias
  follows it, as when it was pruned. With a `Rule` (or include regex) each selected leaf's
  mask is its nonzeros.

  A kept weight that is exactly 0.0 reads as pruned; harmless, as it is zero either way.

  Args:
    tree: pruned param tree, dense or compressed (its encoded leaves are decoded first), or a
      model (its tree is read).
    pruner: the `Pruner` the tree was pruned with, or a `Rule` / include regex.

  >>> pruned = oneshot_prune(params, Pruner(".*kernel", 0.5))
  >>> masks = pruned_masks(pruned, Pruner(".*kernel", 0.5))
  >>> masks["dense1"]["kernel"].dtype, masks["dense1"]["bias"].shape
  (dtype('bool'), ())
  """
  # A compressed tree (pruned then quantized, or pruned and quantized jointly) keeps its pruned
  # weights exactly zero once decoded, so its masks are read off the decoded weights.
  tree = materialize(tree)
  if not isinstance(pruner, Pruner):
    if not isinstance(pruner, (Rule, str)):
      raise InvalidTypeError(
        "`pruned_masks` takes the `Pruner` the tree was pruned with, or a `Rule` / include "
        f"regex; got {type(pruner).__name__}."
      )
    selected = set(select(tree, pruner))
    return map_with_path(
      lambda path, leaf: leaf != 0 if path in selected else jnp.ones((), bool), tree
    )
  units, shapes = pruner.units(tree)
  flat = flatten(tree)
  out: dict[str, jax.Array] = {}
  for unit in units:
    nonzero = {path: (flat[path] != 0).astype(jnp.float32) for path, _ in unit.members}
    keep = pruner.structure.group_scores(unit, nonzero) > 0  # any nonzero weight in the group
    out.update(pruner.structure.expand(unit, keep, shapes))
  return map_with_path(lambda path, leaf: out.get(path, jnp.ones((), bool)), tree)


def mask_sparsity(masks: Any) -> dict[str, float]:
  """Fraction of False per pruned leaf (scalar masks are skipped)."""
  return {
    p: float(1.0 - jnp.mean(m.astype(jnp.float32))) for p, m in flatten(masks).items() if m.ndim
  }
