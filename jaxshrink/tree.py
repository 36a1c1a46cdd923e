"""Leaf paths and selection rules over Flax parameter trees.

Every technique in jaxshrink addresses parameters by a `/`-joined path such as
`Dense_0/kernel` or `encoder/layer_0/attention/query/kernel`. The same path is
produced for a linen variable dict (the `params` collection is looked through)
and for an `nnx.State` (the `.value` of each `nnx.Variable` is looked through),
so one rule works for both frameworks.

>>> params = {"Dense_0": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)}}
>>> select(params, Rule(include=r".*"))   # min_ndim=2 by default: biases and norms stay out
['Dense_0/kernel']

Settings that differ per layer come as an ordered rule list, `[(rule, setting), ...]`: the
*first* rule that matches a leaf decides its setting (as in Qwix), and a rule that selects
nothing, because it matches no leaf or only leaves an earlier rule took, is a `NoMatchError`
(`first_match`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxshrink.encoding import is_encoding
from jaxshrink.errors import InvalidTypeError, InvalidValueError, NoMatchError

PyTree = Any

# How many existing paths a "matched nothing" error lists before eliding the rest.
_MAX_LISTED_PATHS = 40


def _key_name(key: Any) -> str | None:
  """The path component for one `jax.tree_util` key, or None to skip it."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    # nnx.Variable flattens to its `.value`; the variable itself is the leaf.
    return None if key.name == "value" else key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_string(key_path: tuple[Any, ...]) -> str:
  """Joins a `jax.tree_util` key path into `a/b/c`."""
  return "/".join(name for name in map(_key_name, key_path) if name is not None)


def key_components(key_path: tuple[Any, ...]) -> tuple[str | int, ...]:
  """The dict keys along a key path, ints kept as ints (nnx lists use them)."""
  parts: list[str | int] = []
  for key in key_path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(key.key if isinstance(key.key, int) else str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(key.idx)
    elif _key_name(key) is not None:
      parts.append(_key_name(key))
  return tuple(parts)


def flatten_with_keys(tree: PyTree) -> list[tuple[str, tuple[str | int, ...], Any]]:
  """`(path, key components, leaf)` for every leaf; encodings count as leaves."""
  leaves = jax.tree_util.tree_flatten_with_path(params_of(tree), is_leaf=is_encoding)[0]
  return [(path_string(kp), key_components(kp), leaf) for kp, leaf in leaves]


def has_other_collections(tree: PyTree) -> bool:
  """True for a linen variable dict holding collections besides `params` (`batch_stats`...)."""
  return params_of(tree) is not tree and len(tree) > 1


def flatten_to_store(tree: PyTree) -> list[tuple[str, tuple[str | int, ...], Any]]:
  """`(path, key components, leaf)` of every leaf a checkpoint must keep.

  A linen variable dict with collections besides `params` keeps all of them, each under its
  collection name (`params/Dense_0/kernel`, `batch_stats/BatchNorm_0/mean`), so saving never
  drops state; any other tree is `flatten_with_keys` (paths without the `params/` prefix).
  """
  if not has_other_collections(tree):
    return flatten_with_keys(tree)
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_encoding)[0]
  return [(path_string(kp), key_components(kp), leaf) for kp, leaf in leaves]


def unflatten(entries: list[tuple[tuple[str | int, ...], Any]]) -> dict:
  """Rebuilds a nested dict from `(key components, leaf)` pairs."""
  root: dict = {}
  for keys, leaf in entries:
    node = root
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = leaf
  return root


def params_of(tree: PyTree) -> PyTree:
  """The parameter tree inside a linen variable dict; any other tree as is."""
  if isinstance(tree, Mapping) and "params" in tree and not _is_array(tree["params"]):
    return tree["params"]
  return tree


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray))


def flatten(tree: PyTree) -> dict[str, Any]:
  """Maps each leaf path to its leaf; compressed encodings count as leaves.

  Args:
    tree: a param dict, linen variable dict, `nnx.State` or compressed tree.

  Returns:
    An ordered dict `{path: leaf}` in `jax.tree_util` flattening order.
  """
  flat = {}
  for path, _, leaf in flatten_with_keys(tree):
    if path in flat:
      raise InvalidValueError(f"Two leaves share the path `{path}`; rename one of the modules.")
    flat[path] = leaf
  return flat


def map_with_path(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
  """Applies `fn(path, leaf)` to every leaf; keeps linen's `params` wrapper."""

  def visit(key_path, leaf):
    return fn(path_string(key_path), leaf)

  inner = params_of(tree)
  mapped = jax.tree_util.tree_map_with_path(visit, inner, is_leaf=is_encoding)
  if inner is tree:
    return mapped
  return {**tree, "params": mapped}


@dataclasses.dataclass(frozen=True)
class Rule:
  """Which leaves a technique touches.

  A leaf is selected when its path fully matches `include`, does not fully
  match `exclude`, has at least `min_ndim` dimensions and `min_size` elements.

  Attributes:
    include: regex matched against the whole path (`re.fullmatch`).
    exclude: regex of paths to leave alone, or None.
    min_ndim: smallest rank selected; the default 2 skips biases and norm scales (as Qwix,
      which quantizes kernels, not biases); 0 or 1 selects vectors too.
    min_size: smallest element count selected.
  """

  include: str = ".*"
  exclude: str | None = None
  min_ndim: int = 2
  min_size: int = 0

  def __post_init__(self):
    for field in ("include", "exclude"):
      pattern = getattr(self, field)
      if pattern is None and field == "exclude":
        continue
      if not isinstance(pattern, str):
        raise InvalidTypeError(
          f"Rule `{field}` must be a regex string; got {type(pattern).__name__}."
        )
      try:
        re.compile(pattern)
      except re.error as e:
        raise InvalidValueError(
          f"Rule `{field}` is not a valid regex: {pattern!r} ({e}). Escape special characters "
          r"such as `[` or `(` with a backslash."
        ) from None
    for field in ("min_ndim", "min_size"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidValueError(f"Rule `{field}` must be a non-negative int; got {value!r}.")

  def matches(self, path: str, leaf: Any) -> bool:
    if re.fullmatch(self.include, path) is None:
      return False
    if self.exclude is not None and re.fullmatch(self.exclude, path) is not None:
      return False
    shape = tuple(getattr(leaf, "shape", ()))
    return len(shape) >= self.min_ndim and int(np.prod(shape, dtype=np.int64)) >= self.min_size

  def describe(self) -> str:
    """E.g. `Rule(include='.*kernel', min_ndim=0)`; fields at their default are left out."""
    parts = [f"include={self.include!r}"]
    if self.exclude is not None:
      parts.append(f"exclude={self.exclude!r}")
    if self.min_ndim != 2:
      parts.append(f"min_ndim={self.min_ndim}")
    if self.min_size:
      parts.append(f"min_size={self.min_size}")
    return "Rule(" + ", ".join(parts) + ")"


def paths_rule(paths: Iterable[str]) -> Rule:
  """A rule selecting exactly `paths`, whatever their rank (e.g. what is left to calibrate
  after overrides, or one block of sequential calibration)."""
  return Rule(include="|".join(re.escape(p) for p in paths), min_ndim=0)


def as_rule(rule: Rule | str) -> Rule:
  """Accepts a `Rule` or a bare include regex."""
  if isinstance(rule, Rule):
    return rule
  if isinstance(rule, str):
    return Rule(include=rule)
  raise InvalidTypeError(f"Expected a Rule or a regex string; got {type(rule).__name__}.")


def _too_small(rule: Rule, flat: Mapping[str, Any]) -> str:
  """Why leaves the regexes accept were still left out (rank or size), for error messages."""
  regex_only = dataclasses.replace(rule, min_ndim=0, min_size=0)
  small = [p for p, leaf in flat.items() if regex_only.matches(p, leaf)]
  if not small:
    return ""
  return (
    f" The regex matches {', '.join(f'`{p}`' for p in small[:3])}"
    f"{' ...' if len(small) > 3 else ''}, but with fewer than min_ndim={rule.min_ndim} dims or "
    f"min_size={rule.min_size} elements; pass `min_ndim=1` (or 0) to select vectors."
  )


def no_match_message(rule: Rule, paths: list[str], flat: Mapping[str, Any] | None = None) -> str:
  """`rule` matched nothing: the paths that exist, and any leaves left out by rank or size."""
  listed = paths[:_MAX_LISTED_PATHS]
  more = f" (and {len(paths) - len(listed)} more)" if len(paths) > len(listed) else ""
  return (
    f"{rule.describe()} matched no parameter. Paths that exist: {', '.join(listed)}{more}. "
    "Fix the `target` regex (it must match the whole path)."
    + (_too_small(rule, flat) if flat is not None else "")
  )


def select(tree: PyTree, rule: Rule | str) -> list[str]:
  """Paths of the leaves selected by `rule`; raises if there are none.

  Raises:
    NoMatchError: when nothing matches; the message lists the existing paths.
  """
  rule = as_rule(rule)
  flat = flatten(tree)
  chosen = [path for path, leaf in flat.items() if rule.matches(path, leaf)]
  if not chosen:
    raise NoMatchError(no_match_message(rule, list(flat), flat))
  return chosen


def first_match(
  tree: PyTree, rules: Sequence[tuple[Rule | str, Any]], *, what: str = "rules", label: str = "Rule"
) -> dict[str, Any]:
  """`{path: setting}` from an ordered rule list: the first rule matching a leaf decides.

  Every rule must select at least one leaf, so a rule list written for "later rules win" (a
  catch-all first, the exceptions after it) fails loudly instead of silently ignoring the
  exceptions.

  Args:
    tree: the param tree.
    rules: `[(Rule | include regex, setting), ...]`, most specific first.
    what: how error messages name the list (`overrides`, ...).
    label: how error messages name one entry (`Override`, ...).

  Returns:
    The matched leaves in flattening order, each with its first matching rule's setting.

  Raises:
    NoMatchError: a rule matches no leaf, or only leaves an earlier rule already took.

  >>> first_match(params, [("dense2/kernel", 8), (".*kernel", 4)])
  {'dense1/kernel': 4, 'dense2/kernel': 8}
  """
  flat = flatten(tree)
  parsed = [(as_rule(rule), setting) for rule, setting in rules]
  owner: dict[str, int] = {}
  hits = [0] * len(parsed)
  for index, (rule, _) in enumerate(parsed):
    matched = [p for p, leaf in flat.items() if rule.matches(p, leaf)]
    if not matched:
      where = f"{label} `{what}[{index}]`: "
      raise NoMatchError(where + no_match_message(rule, list(flat), flat))
    for path in matched:
      if path not in owner:
        owner[path] = index
        hits[index] += 1
    if not hits[index]:
      earlier = sorted({owner[p] for p in matched})
      raise NoMatchError(
        f"{label} `{what}[{index}]`: {rule.describe()} selects nothing: every leaf it matches "
        f"({', '.join(matched[:3])}{' ...' if len(matched) > 3 else ''}) is taken by "
        f"{', '.join(f'`{what}[{i}]`' for i in earlier)}. Rules are first-match: put the more "
        "specific rule first."
      )
  return {p: parsed[owner[p]][1] for p in flat if p in owner}


def map_selected(fn: Callable[[str, Any], Any], tree: PyTree, rule: Rule | str) -> PyTree:
  """Replaces each leaf selected by `rule` with `fn(path, leaf)`.

  >>> map_selected(lambda p, w: w * 0, params, Rule(include=".*kernel"))
  """
  chosen = set(select(tree, rule))
  return map_with_path(lambda path, leaf: fn(path, leaf) if path in chosen else leaf, tree)
