"""Sparsity structures: which weights are pruned together.

- `Unstructured()`: any single weight.
- `NM(n, m, axis)`: keep `n` of every `m` consecutive weights along `axis`
  (2:4 is what sparse tensor cores run). Its sparsity is fixed at `1 - n/m`.
- `Block(rows, cols)`: `rows x cols` tiles of the last two axes.
- `Channel(axis)`: whole output channels / conv filters (`axis=-1`, the
  matching bias entries follow) or input channels (`axis=-2`).
- `Heads(num_heads)` / `Heads(head_size=...)`: whole attention heads: the
  query/key/value columns (and biases) and the output projection's rows of
  one head are pruned together.

A structure splits the selected leaves into *units* (a leaf, or the leaves of
one attention layer) whose weights fall into *groups* that are kept or pruned
as one. Allocation ranks groups by their summed scores.

>>> nm_mask(jnp.array([[4., 1., 3., 2.]]), 2, 4, axis=-1).tolist()
[[True, False, True, False]]
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.errors import InvalidTypeError, InvalidValueError

STRUCTURES = ("unstructured", "N:M", "block", "channel", "heads")


@dataclasses.dataclass(frozen=True)
class Unit:
  """Leaves sharing one set of groups.

  Attributes:
    name: the kernel path, or the attention module prefix for heads.
    members: `(path, group axis or None)` of every scored leaf.
    followers: `(path, axis)` of leaves masked with the same groups but not scored (biases).
    num_groups: groups in the unit.
    group_size: weights per group over all members.
  """

  name: str
  members: tuple[tuple[str, int | None], ...]
  followers: tuple[tuple[str, int], ...]
  num_groups: int
  group_size: int


def _order_keys(scores: jax.Array) -> jax.Array:
  """uint32 keys with the same order as the float scores (-0.0 counts as +0.0)."""
  x = jnp.where(scores == 0, 0.0, scores.astype(jnp.float32))
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  sign = jnp.uint32(0x80000000)
  # Positive floats order like their bits; negative ones in reverse. Flipping puts both on
  # one unsigned scale: negatives below positives, larger magnitudes further out.
  return jnp.where(bits >= sign, ~bits, bits | sign)


def _flat_index(shape: tuple[int, ...], offset: int) -> jax.Array:
  """Row-major position of every element, built from iotas so it stays shard-local."""
  index = jnp.full(shape, offset, jnp.int32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.int32, shape, axis) * stride
    stride *= shape[axis]
  return index


def keep_top_many(scores: list[jax.Array], n_keep: Any) -> list[jax.Array]:
  """Bool masks keeping exactly the `n_keep` highest scores over all arrays together.

  Ties go to the lower position in the concatenation of the raveled arrays. The arrays keep
  their shapes: the k-th largest key is found bit by bit (radix select) with one count per
  bit, then ties are cut by position the same way. Every step is an elementwise compare and
  a sum, so on params split over a mesh each device counts its shard and only scalars cross
  devices; no parameter is gathered, as a sort would need to. `n_keep` may be traced.
  """
  keys = [_order_keys(s) for s in scores]
  offsets = np.cumsum([0] + [_size(s.shape) for s in scores])  # row-major start of each array
  total = int(offsets[-1])
  n_keep = jnp.asarray(n_keep, jnp.int32)

  def count(pred) -> jax.Array:
    return sum(jnp.sum(pred(i, k), dtype=jnp.int32) for i, k in enumerate(keys))

  def threshold_bit(bit, t):
    candidate = t | (jnp.uint32(1) << bit.astype(jnp.uint32))
    return jnp.where(count(lambda i, k: k >= candidate) >= n_keep, candidate, t)

  # Largest t with at least n_keep keys >= t: the n_keep-th largest key.
  t = jax.lax.fori_loop(0, 32, lambda j, t: threshold_bit(31 - j, t), jnp.uint32(0))
  need = n_keep - count(lambda i, k: k > t)  # ties at t still to keep, >= 1 when n_keep >= 1
  positions = [_flat_index(s.shape, int(o)) for s, o in zip(scores, offsets[:-1], strict=True)]
  index_bits = max(1, int(total - 1).bit_length())

  def cut_bit(bit, b):
    candidate = b | (jnp.int32(1) << bit)
    fewer = count(lambda i, k: (k == t) & (positions[i] < candidate)) < need
    return jnp.where(fewer, candidate, b)

  # Largest b with fewer than `need` ties before it: the tie at b is the last one kept.
  cut = jax.lax.fori_loop(0, index_bits, lambda j, b: cut_bit(index_bits - 1 - j, b), 0)
  return [
    ((k > t) | ((k == t) & (p <= cut))) & (n_keep > 0) | (n_keep >= total)
    for k, p in zip(keys, positions, strict=True)
  ]


def keep_top(scores: jax.Array, n_keep: Any) -> jax.Array:
  """Bool mask keeping exactly the `n_keep` highest scores of an array (ties: lower
  row-major position wins). `n_keep` may be traced, so schedules can move it inside `jit`;
  see `keep_top_many` for why no sort is used."""
  return keep_top_many([scores], n_keep)[0]


def nm_mask(scores: jax.Array, n: int, m: int, axis: int = -2) -> jax.Array:
  """Keeps the `n` highest scores in every `m` consecutive entries along `axis` (bool)."""
  moved = jnp.moveaxis(scores, axis, -1)
  groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
  order = jnp.argsort(-groups, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1)
  keep = (ranks < n).reshape(moved.shape)
  return jnp.moveaxis(keep, -1, axis)


def _axis_group_scores(score: jax.Array, axis: int, groups: int) -> jax.Array:
  moved = jnp.moveaxis(score, axis, -1)
  return moved.reshape(-1, groups, moved.shape[-1] // groups).sum(axis=(0, 2))


def _expand_axis(keep: jax.Array, shape: tuple[int, ...], axis: int) -> jax.Array:
  per_channel = jnp.repeat(keep, shape[axis] // keep.shape[0])
  view = [1] * len(shape)
  view[axis] = shape[axis]
  return jnp.broadcast_to(per_channel.reshape(view), shape)


def _size(shape) -> int:
  return int(np.prod(shape, dtype=np.int64))


class Structure:
  """Base: one unit per leaf, every weight its own group."""

  name = "unstructured"

  def check_leaf(self, path: str, shape: tuple[int, ...]) -> None:
    del path, shape

  def units(self, shapes: dict[str, tuple[int, ...]], all_shapes: dict[str, tuple]) -> list[Unit]:
    for path, shape in shapes.items():
      self.check_leaf(path, shape)
    return [self._unit(path, shape, all_shapes) for path, shape in shapes.items()]

  def _unit(self, path, shape, all_shapes) -> Unit:
    del all_shapes
    return Unit(path, ((path, None),), (), _size(shape), 1)

  def group_scores(self, unit: Unit, scores: dict[str, jax.Array]) -> jax.Array:
    # Every weight is its own group; keeping the leaf's shape (no ravel) keeps its layout
    # on a mesh.
    return scores[unit.members[0][0]]

  def expand(self, unit: Unit, keep: jax.Array, shapes: dict[str, tuple]) -> dict[str, jax.Array]:
    path = unit.members[0][0]
    return {path: keep.reshape(shapes[path])}


@dataclasses.dataclass(frozen=True)
class Unstructured(Structure):
  name = "unstructured"


@dataclasses.dataclass(frozen=True)
class NM(Structure):
  """`n` kept of every `m` consecutive weights along `axis` (default: the input axis)."""

  n: int = 2
  m: int = 4
  axis: int = -2
  name = "N:M"

  def __post_init__(self):
    for f in ("n", "m", "axis"):
      if isinstance(getattr(self, f), bool) or not isinstance(getattr(self, f), int):
        raise InvalidTypeError(f"N:M `{f}` must be an int; got {getattr(self, f)!r}.")
    if not 0 < self.n <= self.m:
      raise InvalidValueError(
        f"N:M needs 0 < N <= M (N weights kept of every M); got N={self.n}, M={self.m}. "
        "Write e.g. '2:4'."
      )

  @property
  def sparsity(self) -> float:
    return 1.0 - self.n / self.m

  def check_leaf(self, path, shape):
    if not -len(shape) <= self.axis < len(shape):
      raise InvalidValueError(
        f"N:M axis {self.axis} is out of range for `{path}` with shape {shape}; pick an axis "
        f"in [-{len(shape)}, {len(shape) - 1}] or exclude the leaf."
      )
    if shape[self.axis] % self.m:
      raise InvalidValueError(
        f"N:M sparsity needs `{path}`.shape[{self.axis}] divisible by M={self.m}; got shape "
        f"{shape}. Exclude the leaf from `target`, or choose another `axis`."
      )


@dataclasses.dataclass(frozen=True)
class Block(Structure):
  """`rows x cols` tiles over the last two axes."""

  rows: int = 4
  cols: int = 4
  name = "block"

  def check_leaf(self, path, shape):
    if len(shape) < 2 or shape[-2] % self.rows or shape[-1] % self.cols:
      raise InvalidValueError(
        f"block sparsity needs `{path}` to have >= 2 dims with the last two divisible by "
        f"({self.rows}, {self.cols}); got shape {shape}. Pick a block that divides them or "
        "exclude the leaf."
      )

  def _unit(self, path, shape, all_shapes):
    return Unit(
      path, ((path, None),), (), _size(shape) // (self.rows * self.cols), self.rows * self.cols
    )

  def group_scores(self, unit, scores):
    s = scores[unit.members[0][0]]
    *lead, h, w = s.shape
    tiles = s.reshape(*lead, h // self.rows, self.rows, w // self.cols, self.cols)
    return tiles.sum(axis=(-3, -1)).ravel()

  def expand(self, unit, keep, shapes):
    path = unit.members[0][0]
    *lead, h, w = shapes[path]
    tiles = keep.reshape(*lead, h // self.rows, 1, w // self.cols, 1)
    full = jnp.broadcast_to(tiles, (*lead, h // self.rows, self.rows, w // self.cols, self.cols))
    return {path: full.reshape(shapes[path])}


def _sibling_bias(path: str, channels: int, all_shapes: dict[str, tuple]) -> tuple:
  bias = path.rsplit("/", 1)[0] + "/bias" if "/" in path else "bias"
  return ((bias, 0),) if all_shapes.get(bias) == (channels,) else ()


@dataclasses.dataclass(frozen=True)
class Channel(Structure):
  """Whole channels along `axis`: -1 = output channels / filters (bias follows), -2 = inputs."""

  axis: int = -1
  name = "channel"

  def check_leaf(self, path, shape):
    if len(shape) < 2:
      raise InvalidValueError(
        f"channel pruning needs a kernel with >= 2 dims; `{path}` has shape {shape} (a bias or "
        "scale). Biases follow their kernel's channel mask: set `target` to kernels only, e.g. "
        "'.*kernel'."
      )

  def _unit(self, path, shape, all_shapes):
    channels = shape[self.axis]
    followers = (
      _sibling_bias(path, channels, all_shapes) if self.axis in (-1, len(shape) - 1) else ()
    )
    return Unit(path, ((path, self.axis),), followers, channels, _size(shape) // channels)

  def group_scores(self, unit, scores):
    path, axis = unit.members[0]
    return _axis_group_scores(scores[path], axis, unit.num_groups)

  def expand(self, unit, keep, shapes):
    out = {}
    for path, axis in unit.members + unit.followers:
      out[path] = _expand_axis(keep, shapes[path], axis)
    return out


@dataclasses.dataclass(frozen=True)
class Heads(Structure):
  """Whole attention heads of layers whose q/k/v/out projections the rule selects.

  The head count of a layer is `num_heads`, or its q/k/v width over `head_size` when that is
  given (a model whose layers kept different numbers of heads). The projections are the
  `*/{query,key,value}/kernel` columns and the `*/{out,output}/kernel` rows of each head
  (tiny-lm and BERT naming); the q/k/v biases follow.
  """

  num_heads: int | None = None
  head_size: int | None = None
  qkv: tuple[str, ...] = ("query", "key", "value")
  out: tuple[str, ...] = ("out", "output")
  name = "heads"

  def __post_init__(self):
    given = [f for f in ("num_heads", "head_size") if getattr(self, f) is not None]
    if len(given) != 1:
      raise InvalidValueError(
        "structure 'heads' needs exactly one of `num_heads` (heads per layer) or `head_size` "
        f"(features per head); got num_heads={self.num_heads}, head_size={self.head_size}. Set "
        "the `num_heads` option, or prune a model whose config has `num_heads`."
      )
    value = getattr(self, given[0])
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise InvalidValueError(f"Heads `{given[0]}` must be a positive int; got {value!r}.")
    for f in ("qkv", "out"):
      if isinstance(getattr(self, f), str):
        object.__setattr__(self, f, (getattr(self, f),))

  def heads_of(self, path: str, width: int) -> int:
    """Heads in a projection with `width` head features; raises if they do not divide."""
    if self.head_size is not None:
      if width % self.head_size:
        raise InvalidValueError(
          f"`{path}` has {width} head features, not a multiple of head_size={self.head_size}; "
          "set `head_size` to the model's features per head."
        )
      return width // self.head_size
    if width % self.num_heads:
      raise InvalidValueError(
        f"`{path}` has {width} features, not divisible by num_heads={self.num_heads}; set "
        "`num_heads` to the model's head count."
      )
    return self.num_heads

  def modules(self, paths: Any) -> dict[str, dict[str, str]]:
    """`{attention prefix: {projection name: kernel path}}` for the attention kernels in `paths`.

    Raises:
      InvalidValueError: for a path that is not an attention kernel, or a module with no q/k/v.
    """
    names = self.qkv + self.out
    pattern = re.compile(rf"(.*)/({'|'.join(map(re.escape, names))})/kernel")
    modules: dict[str, dict[str, str]] = {}
    for path in paths:
      match = pattern.fullmatch(path)
      if match is None:
        raise InvalidValueError(
          f"head pruning needs attention kernels named */{{{','.join(names)}}}/kernel; `{path}` "
          "is not one. Set `target` to e.g. '.*attention/.*/kernel'."
        )
      modules.setdefault(match.group(1), {})[match.group(2)] = path
    for prefix, found in modules.items():
      if not set(found) & set(self.qkv):
        raise InvalidValueError(
          f"`{next(iter(found.values()))}` was selected for head pruning but `{prefix}` has no "
          f"selected {'/'.join(self.qkv)} kernel, so it is not an attention layer's output. Set "
          "`target` to the attention kernels only, e.g. '.*attention/.*/kernel'."
        )
    return modules

  def units(self, shapes, all_shapes):
    for path, shape in shapes.items():
      if len(shape) != 2:
        raise InvalidValueError(
          f"head pruning needs 2-D attention kernels; `{path}` has shape {shape}. Set `target` "
          "to e.g. '.*attention/.*/kernel'."
        )
    units = []
    for prefix, found in self.modules(shapes).items():
      members, followers, counts = [], [], set()
      for proj, path in found.items():
        axis = 0 if proj in self.out else 1
        width = shapes[path][axis]
        counts.add(self.heads_of(path, width))
        members.append((path, axis))
        if axis == 1:
          followers += _sibling_bias(path, width, all_shapes)
      if len(counts) != 1:
        raise InvalidValueError(
          f"the projections of `{prefix}` disagree on the head count ({sorted(counts)}): "
          f"{ {p: shapes[p] for p in found.values()} }. Pass `head_size` for a layer whose "
          "heads were shrunk."
        )
      heads = counts.pop()
      size = sum(_size(shapes[p]) for p, _ in members) // heads
      units.append(Unit(prefix, tuple(members), tuple(followers), heads, size))
    return units

  def group_scores(self, unit, scores):
    return sum(_axis_group_scores(scores[p], a, unit.num_groups) for p, a in unit.members)

  def expand(self, unit, keep, shapes):
    return {p: _expand_axis(keep, shapes[p], a) for p, a in unit.members + unit.followers}


def parse_structure(
  spec: Any, *, num_heads: int | None = None, head_size: int | None = None, block=(4, 4)
) -> Structure:
  """A `Structure` from a recipe string: `unstructured`, `"2:4"`, `block`, `channel`, `heads`.

  `heads` uses `head_size` when given, else `num_heads`, else 4 heads.
  """
  if isinstance(spec, Structure):
    return spec
  if not isinstance(spec, str):
    raise InvalidTypeError(
      f"`structure` must be a string such as '2:4'; got {type(spec).__name__}."
    )
  if spec == "unstructured":
    return Unstructured()
  if spec == "channel":
    return Channel(-1)
  if spec == "input_channel":
    return Channel(-2)
  if spec == "block":
    return Block(*block)
  if spec == "heads":
    if head_size is not None:
      return Heads(head_size=head_size)
    return Heads(num_heads or 4)
  match = re.fullmatch(r"(\d+):(\d+)", spec)
  if match:
    return NM(int(match.group(1)), int(match.group(2)))
  raise InvalidValueError(
    f"Unknown structure {spec!r}; expected one of unstructured, 'N:M' (e.g. '2:4'), block, "
    "channel, input_channel, heads, or a `Structure` instance, for the `structure` argument."
  )
