"""How one leaf becomes named arrays plus JSON, and back; shared by every file format.

A dense leaf is the single array `value`. An `Encoding` is its array fields
(nested encodings flattened with dotted names such as `values.codes`) plus a
JSON description: encoding name, logical shape and dtype, the static fields
that differ from the class defaults (None where a field has no default), and
nested descriptions. An optional
array field that is absent (a symmetric code's zero point) is simply not among
the arrays. Decoding goes through the encoding registry only, so no file
content is ever executed.

>>> arrays, meta = encode_leaf(quantize(jnp.ones((64, 8)), QuantSpec(bits=8)))
>>> sorted(arrays), meta["encoding"], meta["shape"]
(['codes', 'scale'], 'qarray', [64, 8])
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxshrink import encoding
from jaxshrink.errors import InvalidValueError
from jaxshrink.export import nm_ranks

DENSE = "array"  # the encoding name recorded for a leaf stored as a plain array
_LOGICAL = ("shape", "dtype")  # recorded beside the encoding name, not among the statics


def to_json(value: Any) -> Any:
  if isinstance(value, tuple):
    return [to_json(v) for v in value]
  if isinstance(value, (np.integer, np.floating, np.bool_)):
    return value.item()
  return value


def from_json(value: Any) -> Any:
  # Static fields are hashable pytree aux data, so every JSON list was a tuple.
  if isinstance(value, list):
    return tuple(from_json(v) for v in value)
  return value


def _defaults(cls: type) -> dict[str, Any]:
  return {
    f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
  }


def _nm_geometry(static: dict[str, Any], shape: tuple[int, ...]) -> dict[str, int]:
  length = shape[static["axis"]]
  return {
    "n": static["n"],
    "m": static["m"],
    "groups": length // static["m"],
    "cols": int(np.prod(shape, dtype=np.int64)) // max(length, 1),
  }


def encode_leaf(
  leaf: Any, *, compact: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Splits a leaf into its stored arrays and a JSON description.

  Args:
    leaf: a dense array or an `Encoding` (possibly nested).
    compact: store N:M positions as pattern ranks (`nm_ranks`, checkpoints); the
      description then says so under `stored_as`. False keeps every array as the
      encoding holds it (safetensors, for other runtimes).

  Returns:
    `(arrays, meta)`: arrays by (dotted) field name, in field order, and the JSON-ready
    description `{"encoding", "shape", "dtype", "static"?, "children"?}`.
  """
  if not isinstance(leaf, encoding.Encoding):
    value = np.asarray(leaf)
    return {"value": value}, {
      "encoding": DENSE,
      "shape": list(value.shape),
      "dtype": value.dtype.name,
    }
  arrays: dict[str, np.ndarray] = {}
  meta: dict[str, Any] = {
    "encoding": leaf.name,
    "shape": to_json(tuple(int(d) for d in leaf.shape)),
    "dtype": str(leaf.dtype),
  }
  defaults = _defaults(type(leaf))
  # A static field equal to its default, or None where there is no default, is left out.
  static = {
    k: to_json(v)
    for k, v in leaf.static_fields().items()
    if k not in _LOGICAL and v != defaults.get(k)
  }
  if static:
    meta["static"] = static
  for field, child in leaf.children().items():
    if child is None:  # optional array fields, e.g. no zero point for symmetric codes
      continue
    if isinstance(child, encoding.Encoding):
      child_arrays, child_meta = encode_leaf(child, compact=compact)
      arrays.update({f"{field}.{k}": v for k, v in child_arrays.items()})
      meta.setdefault("children", {})[field] = child_meta
    else:
      arrays[field] = np.asarray(child)
  if compact and leaf.name == "nm":
    ranks = nm_ranks.encode(arrays["indices"], **_nm_geometry(leaf.static_fields(), leaf.shape))
    if ranks is not None:
      arrays["indices"] = ranks
      meta["stored_as"] = {"indices": nm_ranks.NAME}
  return arrays, meta


def decode_leaf(meta: dict[str, Any], arrays: dict[str, Any]) -> Any:
  """Rebuilds a leaf from `encode_leaf`'s output; unknown encodings raise.

  `arrays` may hold `jax.ShapeDtypeStruct`s instead of arrays: the result is then an
  abstract encoding, enough for `describe()` and `nbytes` (what `inspect` shows).
  """
  if meta["encoding"] == DENSE:
    return arrays["value"]
  cls = encoding.encoding_class(meta["encoding"])
  defaults = _defaults(cls)
  kwargs = {
    f.name: None
    for f in dataclasses.fields(cls)
    if f.name not in cls.array_fields and f.name not in defaults
  }
  kwargs.update({k: from_json(v) for k, v in meta.get("static", {}).items()})
  kwargs["shape"] = tuple(meta["shape"])
  kwargs["dtype"] = meta["dtype"]
  children = meta.get("children", {})
  for field in cls.array_fields:
    if field in children:
      prefix = field + "."
      sub = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
      kwargs[field] = decode_leaf(children[field], sub)
    else:
      kwargs[field] = arrays.get(field)
  stored_as = meta.get("stored_as", {})
  if stored_as.get("indices") == nm_ranks.NAME and isinstance(kwargs["indices"], np.ndarray):
    geometry = _nm_geometry(kwargs, kwargs["shape"])
    kwargs["indices"] = nm_ranks.decode(kwargs["indices"], **geometry)
  elif set(stored_as) - {"indices"} or set(stored_as.values()) - {nm_ranks.NAME}:
    raise InvalidValueError(f"Unknown stored form {stored_as}; upgrade jaxshrink.")
  return cls(**kwargs)
