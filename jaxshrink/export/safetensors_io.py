"""Interop: a compressed tree as one safetensors file any runtime can read.

Each stored array becomes a tensor named `<leaf path>:<field>` (e.g.
`dense1/kernel:codes`, `dense1/kernel:scale`). The safetensors header's
metadata holds `jaxshrink.layout`: JSON describing, per leaf, the encoding,
its static fields (bits, group size, packing, logical shape and dtype) and the
tensor names, so a non-JAX reader can unpack codes and apply scales. Tensors
whose dtype safetensors lacks (fp8 on older readers) are stored as uint8 bytes
with their real dtype in the layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxshrink.errors import CheckpointError
from jaxshrink.export.layout import decode_leaf, encode_leaf
from jaxshrink.tree import flatten_to_store, unflatten

LAYOUT_KEY = "jaxshrink.layout"
LAYOUT_VERSION = 2  # 2: `layout.encode_leaf` records shape and dtype beside the encoding
_NATIVE = {
  "bool",
  "uint8",
  "int8",
  "int16",
  "uint16",
  "int32",
  "uint32",
  "int64",
  "uint64",
  "float16",
  "bfloat16",
  "float32",
  "float64",
}


def export_safetensors(tree: Any, out: str | os.PathLike, *, metadata: dict | None = None) -> Path:
  """Writes `tree` (compressed or float) to one `.safetensors` file, atomically.

  >>> export_safetensors(load("out/int8"), "model.safetensors")
  """
  from safetensors.numpy import save_file

  tensors: dict[str, np.ndarray] = {}
  leaves = []
  for path, keys, leaf in flatten_to_store(tree):
    arrays, meta = encode_leaf(leaf)
    names = {}
    for field, array in arrays.items():
      name = f"{path}:{field}"
      array = np.ascontiguousarray(array)
      info = {"tensor": name, "dtype": array.dtype.name, "shape": list(array.shape)}
      if array.dtype.name not in _NATIVE:
        array = array.reshape(-1).view(np.uint8)
      tensors[name] = array
      names[field] = info
    leaves.append({"path": path, "keys": list(keys), "meta": meta, "arrays": names})
  layout = {"version": LAYOUT_VERSION, "leaves": leaves}
  header = {LAYOUT_KEY: json.dumps(layout), **{k: str(v) for k, v in (metadata or {}).items()}}
  out = Path(out)
  staging = out.with_name(f".{out.name}.partial")
  save_file(tensors, str(staging), metadata=header)
  os.replace(staging, out)
  return out


def import_safetensors(path: str | os.PathLike) -> dict:
  """Reads a file written by `export_safetensors` back into the compressed tree."""
  from safetensors import safe_open

  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"`{path}` does not exist; expected a .safetensors file.")
  try:
    with safe_open(str(path), framework="numpy") as f:
      header = f.metadata() or {}
      if LAYOUT_KEY not in header:
        raise CheckpointError(
          f"`{path}` has no `{LAYOUT_KEY}` metadata; it was not written by jaxshrink."
        )
      layout = json.loads(header[LAYOUT_KEY])
      version = layout.get("version", 0)
      if version != LAYOUT_VERSION:
        fix = "upgrade jaxshrink" if version > LAYOUT_VERSION else "re-export it"
        raise CheckpointError(
          f"`{path}` has layout version {version}; this jaxshrink reads {LAYOUT_VERSION}: {fix}."
        )
      entries = []
      for leaf in layout["leaves"]:
        arrays = {}
        for field, info in leaf["arrays"].items():
          array = f.get_tensor(info["tensor"])
          if array.dtype.name != info["dtype"]:
            array = array.view(np.dtype(info["dtype"])).reshape(info["shape"])
          arrays[field] = array
        entries.append((tuple(leaf["keys"]), decode_leaf(leaf["meta"], arrays)))
  except CheckpointError:
    raise
  except Exception as e:  # safetensors raises its own error types for damaged files
    raise CheckpointError(f"Cannot read `{path}` ({type(e).__name__}: {e}).") from None
  return unflatten(entries)
