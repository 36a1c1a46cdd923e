"""The compressed-leaf protocol.

A *compressed tree* is a parameter tree in which some leaves are `Encoding`s:
compact representations (quantized codes, sparse values, low-rank factors, ...)
of one dense array. Every encoding is a JAX pytree whose array fields are
children and whose other fields are static, so a compressed tree passes through
`jax.jit` unchanged and `materialize` decodes it inside the compiled function:
XLA fuses the decode into the consumer and only the compact form is resident.

To add an encoding, subclass `Encoding` as a frozen dataclass, list the array
fields in `array_fields` (a field may itself hold a nested `Encoding`, e.g.
sparse values that are quantized), implement `materialize`, and decorate with
`@register_encoding`. Export, reports and `materialize` then handle it.

>>> from jaxshrink.cast import Cast
>>> enc = Cast.encode(jnp.ones((256, 128)), "bfloat16")
>>> enc.nbytes, enc.bits_per_weight, materialize(enc).dtype
(65536, 16.0, dtype('float32'))
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import numpy as np

from jaxshrink.errors import InvalidTypeError, InvalidValueError

_REGISTRY: dict[str, type[Encoding]] = {}


class Encoding:
  """Base class of compressed leaves. Subclasses are frozen dataclasses.

  Class attributes:
    name: the encoding's identifier in manifests and reports.
    array_fields: names of fields holding arrays or nested encodings.

  Every subclass records the logical `shape` and `dtype` of the array it
  stands for, as static fields.
  """

  name: ClassVar[str]
  array_fields: ClassVar[tuple[str, ...]]
  shape: tuple[int, ...]
  dtype: str

  def materialize(self) -> jax.Array:
    """The dense array this encoding stands for, in its logical dtype."""
    raise NotImplementedError(f"{type(self).__name__} must implement materialize().")

  def children(self) -> dict[str, Any]:
    return {field: getattr(self, field) for field in self.array_fields}

  def static_fields(self) -> dict[str, Any]:
    """Every non-array field, JSON-ready (tuples become lists on disk)."""
    return {
      f.name: getattr(self, f.name)
      for f in dataclasses.fields(self)
      if f.name not in self.array_fields
    }

  @property
  def size(self) -> int:
    """Number of logical elements."""
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def nbytes(self) -> int:
    """Bytes of the compact form: what is stored on disk and kept in memory."""
    return sum(_nbytes(child) for child in self.children().values())

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.nbytes / max(self.size, 1)

  def describe(self) -> str:
    """A short human description, e.g. `int4 g128 symmetric`."""
    return self.name

  def __repr__(self) -> str:
    # Dataclass reprs would print every code; show what a user needs instead.
    shape = "x".join(map(str, self.shape))
    return f"{type(self).__name__}({shape} {self.dtype}, {self.describe()}, {self.nbytes} bytes)"


def _nbytes(x: Any) -> int:
  if x is None:
    return 0
  if isinstance(x, Encoding):
    return x.nbytes
  return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def is_encoding(x: Any) -> bool:
  return isinstance(x, Encoding)


def register_encoding(cls: type) -> type:
  """Class decorator: frozen dataclass, pytree registration, name registry."""
  cls = dataclasses.dataclass(frozen=True, repr=False)(cls)
  fields = [f.name for f in dataclasses.fields(cls)]
  unknown = set(cls.array_fields) - set(fields)
  if unknown:
    raise InvalidTypeError(f"{cls.__name__}.array_fields names missing fields {sorted(unknown)}.")
  if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
    raise InvalidValueError(
      f"Encoding name `{cls.name}` is already registered by {_REGISTRY[cls.name]}."
    )
  meta = [f for f in fields if f not in cls.array_fields]
  jax.tree_util.register_dataclass(cls, data_fields=list(cls.array_fields), meta_fields=meta)
  _REGISTRY[cls.name] = cls
  return cls


def encoding_class(name: str) -> type[Encoding]:
  """The registered class for an encoding name (used when loading)."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise InvalidValueError(
      f"Unknown encoding `{name}`; known encodings: {', '.join(sorted(_REGISTRY))}. "
      "The checkpoint may come from a newer jaxshrink: upgrade it."
    ) from None


def registered_encodings() -> list[str]:
  return sorted(_REGISTRY)


def materialize(tree: Any) -> Any:
  """Decodes every `Encoding` leaf of `tree` into a dense array.

  Call it inside `jax.jit` (e.g. `model.apply(materialize(ctree), x)`) so the
  decode fuses into the consumer and only the compact form stays in memory.
  """
  return jax.tree.map(
    lambda leaf: leaf.materialize() if isinstance(leaf, Encoding) else leaf,
    tree,
    is_leaf=is_encoding,
  )


def logical_shape(leaf: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in leaf.shape)


def logical_dtype(leaf: Any) -> str:
  return str(leaf.dtype) if isinstance(leaf, Encoding) else np.dtype(leaf.dtype).name


def leaf_nbytes(leaf: Any) -> int:
  """Stored bytes of a dense array or of an encoding's compact form."""
  return _nbytes(leaf)


def encoding_name(leaf: Any) -> str:
  """`Encoding.name` for compressed leaves, the dtype name for dense arrays."""
  return leaf.name if isinstance(leaf, Encoding) else np.dtype(leaf.dtype).name


def describe_leaf(leaf: Any) -> str:
  return leaf.describe() if isinstance(leaf, Encoding) else np.dtype(leaf.dtype).name
