"""How one leaf becomes named arrays plus JSON, and back; shared by every file format.

A dense leaf is the single array `value`. An `Encoding` is its array fields
(nested encodings flattened with dotted names such as `values.codes`) plus a
JSON description: encoding name, static fields, nested descriptions, and the
optional fields that are absent. Decoding goes through the encoding registry
only, so no file content is ever executed.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from jaxshrink import encoding

DENSE = "array"  # the encoding name recorded for a leaf stored as a plain array


def checksum(a: np.ndarray) -> str:
  """SHA-256 over dtype, shape and the C-order bytes of `a`."""
  digest = hashlib.sha256()
  digest.update(f"{a.dtype.name}:{a.shape}:".encode())
  digest.update(np.ascontiguousarray(a).tobytes())
  return digest.hexdigest()


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


def encode_leaf(leaf: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Splits a leaf into its stored arrays and a JSON description."""
  if not isinstance(leaf, encoding.Encoding):
    return {"value": np.asarray(leaf)}, {"encoding": DENSE}
  arrays: dict[str, np.ndarray] = {}
  meta: dict[str, Any] = {
    "encoding": leaf.name,
    "static": {k: to_json(v) for k, v in leaf.static_fields().items()},
    "children": {},
  }
  for field, child in leaf.children().items():
    if child is None:  # optional array fields, e.g. no zero point for symmetric codes
      meta.setdefault("absent", []).append(field)
    elif isinstance(child, encoding.Encoding):
      child_arrays, child_meta = encode_leaf(child)
      arrays.update({f"{field}.{k}": v for k, v in child_arrays.items()})
      meta["children"][field] = child_meta
    else:
      arrays[field] = np.asarray(child)
  return arrays, meta


def decode_leaf(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
  """Rebuilds a leaf from `encode_leaf`'s output; unknown encodings raise."""
  if meta["encoding"] == DENSE:
    return arrays["value"]
  cls = encoding.encoding_class(meta["encoding"])
  kwargs = {k: from_json(v) for k, v in meta["static"].items()}
  for field in cls.array_fields:
    if field in meta.get("absent", ()):
      kwargs[field] = None
    elif field in meta["children"]:
      prefix = field + "."
      sub = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
      kwargs[field] = decode_leaf(meta["children"][field], sub)
    else:
      kwargs[field] = arrays[field]
  return cls(**kwargs)
