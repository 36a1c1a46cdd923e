"""Sparse encodings: bytes on disk follow the nonzeros, not the dense shape.

- `BitmaskSparse`: one bit per weight (packed like `np.packbits`, big-endian
  within each `uint8`) plus the nonzero values in row-major order. At 90%
  sparsity a float32 kernel costs 1 + 3.2 bits per weight instead of 32.
- `NMSparse`: N:M sparsity stored as the `n` kept values of every group of `m`
  along the pruned axis plus each value's position in its group
  (`ceil(log2 m)` bits, packed). 2:4 float32 costs 16 + 1 bits per weight.

In both, `values` may be a `jaxshrink.quant.QArray` (prune + quantize): 2:4
with int4 values costs 2 + 1 bits per weight.

>>> enc = BitmaskSparse.encode(w * (jnp.abs(w) > 1.0))
>>> enc.bits.dtype, bool(jnp.all(enc.materialize() == w * (jnp.abs(w) > 1.0)))
(dtype('uint8'), True)
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.encoding import Encoding, register_encoding
from jaxshrink.errors import InvalidValueError
from jaxshrink.model import accepts_models


def _dense(values: Any) -> jax.Array:
  return values.materialize() if isinstance(values, Encoding) else jnp.asarray(values)


def index_bits(m: int) -> int:
  """Bits per in-group position for groups of `m`: 1, 2, 4 or 8 (packing-friendly widths)."""
  need = max(1, int(np.ceil(np.log2(m))))
  return next(b for b in (1, 2, 4, 8) if b >= need)


def pack_small(codes: np.ndarray, bits: int) -> np.ndarray:
  """Packs unsigned codes `< 2**bits` (bits in 1, 2, 4, 8) into uint8, first code lowest."""
  per = 8 // bits
  flat = np.asarray(codes, np.uint8).ravel()
  flat = np.concatenate([flat, np.zeros((-flat.size) % per, np.uint8)]).reshape(-1, per)
  shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
  return np.bitwise_or.reduce(flat << shifts, axis=1).astype(np.uint8)


def unpack_small(packed: jax.Array, bits: int, count: int) -> jax.Array:
  """Inverse of `pack_small` (jit-friendly), int32 codes of length `count`."""
  per = 8 // bits
  shifts = jnp.arange(per, dtype=jnp.uint8) * bits
  codes = (packed[:, None] >> shifts) & jnp.uint8((1 << bits) - 1)
  return codes.reshape(-1)[:count].astype(jnp.int32)


@register_encoding
class BitmaskSparse(Encoding):
  """Packed bitmask plus nonzero values.

  Attributes:
    bits: `(ceil(size / 8),)` uint8, `np.packbits` of the row-major keep mask.
    values: `(nnz,)` kept values (array, or a `QArray` of them).
    shape, dtype: logical shape and dtype.
    nnz: number of kept values.
  """

  name: ClassVar[str] = "bitmask"
  array_fields: ClassVar[tuple[str, ...]] = ("bits", "values")
  bits: jax.Array
  values: Any
  shape: tuple[int, ...]
  dtype: str
  nnz: int

  @classmethod
  def encode(cls, w: Any, mask: Any = None, *, values_encoder=None) -> BitmaskSparse:
    """Encodes `w` keeping `mask` (default: its nonzeros); runs on the host (nnz is data-dependent).

    Args:
      w: dense array.
      mask: bool keep mask shaped like `w`, or None for `w != 0`.
      values_encoder: optional `values -> Encoding` (e.g. int8 quantization of the nonzeros).
    """
    w = np.asarray(w)
    mask = w != 0 if mask is None else np.asarray(mask, bool)
    values = w[mask]
    if values_encoder is not None and values.size:
      values = values_encoder(values)
    return cls(
      bits=np.packbits(mask.ravel()),
      values=values,
      shape=tuple(int(d) for d in w.shape),
      dtype=np.dtype(w.dtype).name,
      nnz=int(mask.sum()),
    )

  def mask(self) -> jax.Array:
    """The bool keep mask, logical shape."""
    return jnp.unpackbits(self.bits, count=self.size).astype(bool).reshape(self.shape)

  def materialize(self) -> jax.Array:
    mask = self.mask().ravel()
    if self.nnz == 0:
      return jnp.zeros(self.shape, self.dtype)
    values = _dense(self.values).astype(self.dtype).reshape(-1)
    position = jnp.clip(jnp.cumsum(mask.astype(jnp.int32)) - 1, 0, self.nnz - 1)
    return jnp.where(mask, values[position], jnp.zeros((), self.dtype)).reshape(self.shape)

  def describe(self) -> str:
    inner = f" values {self.values.describe()}" if isinstance(self.values, Encoding) else ""
    return f"bitmask {1 - self.nnz / max(self.size, 1):.0%} sparse{inner}"


@register_encoding
class NMSparse(Encoding):
  """N:M sparse array: `n` values and their positions for each group of `m`.

  The pruned `axis` is moved first and the rest flattened to `R` columns, so
  `values` is `(A // m * n, R)`: for a Dense kernel `(in, out)` with the default
  axis it is the compressed kernel itself, and quantizing it with
  `contract_dims=(0,)` gives per-output-channel scales.

  Attributes:
    values: `(A // m * n, R)` kept values (array or `QArray`).
    indices: packed uint8 positions in `[0, m)`, `index_bits(m)` bits each.
    shape, dtype: logical shape and dtype.
    n, m, axis: the pattern.
  """

  name: ClassVar[str] = "nm"
  array_fields: ClassVar[tuple[str, ...]] = ("values", "indices")
  values: Any
  indices: jax.Array
  shape: tuple[int, ...]
  dtype: str
  n: int
  m: int
  axis: int

  @classmethod
  def encode(
    cls, w: Any, n: int, m: int, axis: int = -2, *, mask: Any = None, values_encoder=None
  ) -> NMSparse:
    """Keeps, per group of `m` along `axis`, the `mask`ed entries (default: `n` largest |w|).

    Raises:
      InvalidValueError: the axis length is not divisible by `m`, or a group keeps more than `n`.
    """
    w = np.asarray(w)
    axis = axis % w.ndim
    if w.shape[axis] % m:
      raise InvalidValueError(
        f"N:M encoding needs shape[{axis}] divisible by M={m}; got shape {w.shape}. "
        "Exclude the leaf or choose another axis."
      )
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis] // m, m, -1)
    if mask is None:
      score = np.abs(moved)
    else:
      keep = np.moveaxis(np.asarray(mask, bool), axis, 0).reshape(moved.shape)
      if int(keep.sum(axis=1).max(initial=0)) > n:
        raise InvalidValueError(
          f"The mask keeps more than N={n} of some group of M={m}; it is not {n}:{m} sparse. "
          "Prune with structure='N:M' first."
        )
      score = np.where(keep, np.abs(moved) + 1.0, 0.0)  # masked-in entries first
    order = np.sort(np.argsort(-score, axis=1, kind="stable")[:, :n, :], axis=1)
    values = np.take_along_axis(moved, order, axis=1)
    if mask is not None:
      values = np.where(np.take_along_axis(keep, order, axis=1), values, 0).astype(w.dtype)
    values = values.reshape(-1, moved.shape[-1])
    if values_encoder is not None:
      values = values_encoder(values)
    return cls(
      values=values,
      indices=pack_small(order, index_bits(m)),
      shape=tuple(int(d) for d in w.shape),
      dtype=np.dtype(w.dtype).name,
      n=int(n),
      m=int(m),
      axis=int(axis),
    )

  def materialize(self) -> jax.Array:
    moved_shape = (self.shape[self.axis],) + tuple(
      d for i, d in enumerate(self.shape) if i != self.axis
    )
    groups, cols = self.shape[self.axis] // self.m, int(np.prod(moved_shape[1:], dtype=np.int64))
    values = _dense(self.values).astype(self.dtype).reshape(groups, self.n, cols)
    index = unpack_small(self.indices, index_bits(self.m), groups * self.n * cols)
    index = index.reshape(groups, self.n, cols)
    slots = [
      jnp.sum(jnp.where(index == j, values, jnp.zeros((), self.dtype)), axis=1)
      for j in range(self.m)
    ]
    dense = jnp.stack(slots, axis=1).reshape(moved_shape)
    return jnp.moveaxis(dense, 0, self.axis)

  def describe(self) -> str:
    inner = f" values {self.values.describe()}" if isinstance(self.values, Encoding) else ""
    return f"{self.n}:{self.m} along axis {self.axis}{inner}"


def _values_encoder(bits: int | None, path: str):
  if bits is None:
    return None
  from jaxshrink.quant import QuantSpec, quantize

  if bits not in (8, 4, 2):
    raise InvalidValueError(
      f"`quantize_nonzeros` must be null, 8, 4 or 2 bits; got {bits!r} for `{path}`."
    )

  def encode(values):
    # Groups of 64 keep 4/2-bit nonzeros accurate; 8 bits (or short columns) go per column.
    group = 64 if bits < 8 and values.shape[0] >= 64 else None
    spec = QuantSpec(bits=bits, group_size=group)
    return quantize(values, spec, contract_dims=(0,), path=path)

  return encode


@accepts_models
def encode_sparse(
  tree: Any,
  rule: Any = ".*kernel",
  *,
  structure: Any = None,
  masks: Any = None,
  quantize_nonzeros: int | None = None,
) -> Any:
  """Replaces each selected leaf by a sparse encoding of its kept weights.

  Args:
    tree: param tree with pruned (zeroed) weights.
    rule: which leaves to encode (a `Rule` or include regex).
    structure: how the pruned leaves are laid out, as `jaxshrink.sparsity.Pruner` takes it: a
      `Structure` or its string (`"2:4"`, `"unstructured"`, `"channel"`, ...). N:M stores the
      kept values plus their in-group indices; every other structure (and None) a bitmask.
    masks: bool mask tree (default: the leaves' nonzeros).
    quantize_nonzeros: None, or 8 / 4 / 2 to store the kept values as a `QArray`.

  >>> ctree = encode_sparse(pruned, ".*kernel", quantize_nonzeros=8)
  >>> ctree = encode_sparse(pruned_24, ".*kernel", structure="2:4")  # NMSparse leaves

  Raises:
    InvalidValueError: `structure` is a string no structure is parsed from.
    InvalidTypeError: `structure` is neither None, a string nor a `Structure`.
  """
  from jaxshrink.sparsity.structures import NM, parse_structure
  from jaxshrink.tree import flatten, map_selected

  # One parser for every place that takes a structure, so "2:4" here means what it means to
  # `Pruner` instead of silently falling through to a bitmask.
  structure = None if structure is None else parse_structure(structure)
  flat_masks = flatten(masks) if masks is not None else {}

  def encode(path: str, leaf: Any) -> Any:
    if isinstance(leaf, Encoding):
      return leaf
    mask = flat_masks.get(path)
    mask = None if mask is None or np.ndim(mask) == 0 else np.asarray(mask)
    encoder = _values_encoder(quantize_nonzeros, path)
    if isinstance(structure, NM):
      return NMSparse.encode(
        leaf, structure.n, structure.m, structure.axis, mask=mask, values_encoder=encoder
      )
    return BitmaskSparse.encode(leaf, mask, values_encoder=encoder)

  return map_selected(encode, tree, rule)
