"""Compact checkpoints: orbax arrays plus a versioned JSON manifest.

A checkpoint directory holds

- `arrays/`: an orbax checkpoint of only the compact arrays (codes, scales,
  nonzeros, factors). Float weights that an encoding replaces are not written.
- `manifest.json`: format version, jaxshrink version, model and data names,
  the recipe, measured metrics, and per leaf its path, encoding, logical shape
  and dtype, stats and a SHA-256 checksum of every stored array.

Saving is atomic: everything is written into a hidden sibling directory which
is renamed into place only once complete, so a crash never leaves a half
checkpoint under the target name. Loading verifies every checksum. Nothing is
pickled; encodings are rebuilt from the manifest's JSON through the encoding
registry, so an untrusted checkpoint can only fail to load, never run code.

>>> save("out/ckpt", ctree, model="digits-cnn", data="digits")
>>> ctree = load("out/ckpt"); params = load("out/ckpt", dense=True)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from jaxshrink import encoding
from jaxshrink.errors import CheckpointError
from jaxshrink.report import leaf_report, tree_report
from jaxshrink.tree import flatten_with_keys, unflatten

FORMAT = "jaxshrink-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = "arrays"
_DENSE = "array"  # manifest encoding name of a leaf stored as a plain array


def _version() -> str:
  from jaxshrink import __version__

  return __version__


def _checksum(a: np.ndarray) -> str:
  digest = hashlib.sha256()
  digest.update(f"{a.dtype.name}:{a.shape}:".encode())
  digest.update(np.ascontiguousarray(a).tobytes())
  return digest.hexdigest()


def _to_json(value: Any) -> Any:
  if isinstance(value, tuple):
    return [_to_json(v) for v in value]
  if isinstance(value, (np.integer, np.floating, np.bool_)):
    return value.item()
  return value


def _from_json(value: Any) -> Any:
  # Static fields are hashable pytree aux data, so every JSON list was a tuple.
  if isinstance(value, list):
    return tuple(_from_json(v) for v in value)
  return value


def _encode_leaf(leaf: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Splits a leaf into its stored arrays and a JSON description."""
  if not isinstance(leaf, encoding.Encoding):
    return {"value": np.asarray(leaf)}, {"encoding": _DENSE}
  arrays: dict[str, np.ndarray] = {}
  meta: dict[str, Any] = {
    "encoding": leaf.name,
    "static": {k: _to_json(v) for k, v in leaf.static_fields().items()},
    "children": {},
  }
  for field, child in leaf.children().items():
    if child is None:  # optional array fields, e.g. no zero point for symmetric codes
      meta.setdefault("absent", []).append(field)
    elif isinstance(child, encoding.Encoding):
      child_arrays, child_meta = _encode_leaf(child)
      arrays.update({f"{field}.{k}": v for k, v in child_arrays.items()})
      meta["children"][field] = child_meta
    else:
      arrays[field] = np.asarray(child)
  return arrays, meta


def _decode_leaf(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
  if meta["encoding"] == _DENSE:
    return arrays["value"]
  cls = encoding.encoding_class(meta["encoding"])
  kwargs = {k: _from_json(v) for k, v in meta["static"].items()}
  for field in cls.array_fields:
    if field in meta.get("absent", ()):
      kwargs[field] = None
    elif field in meta["children"]:
      prefix = field + "."
      sub = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
      kwargs[field] = _decode_leaf(meta["children"][field], sub)
    else:
      kwargs[field] = arrays[field]
  return cls(**kwargs)


def save(
  directory: str | os.PathLike,
  tree: Any,
  *,
  model: str | None = None,
  data: str | None = None,
  recipe: dict[str, Any] | None = None,
  metrics: dict[str, Any] | None = None,
  overwrite: bool = False,
) -> Path:
  """Writes a compressed (or float) tree as a compact checkpoint, atomically.

  Args:
    directory: the checkpoint directory to create.
    tree: param tree whose leaves are arrays or `Encoding`s.
    model, data: zoo names or `module:factory` sources, so `eval` can rebuild.
    recipe: the recipe that produced the tree, recorded verbatim.
    metrics: measured metrics of the compress run, recorded verbatim.
    overwrite: replace an existing checkpoint at `directory`.

  Returns:
    The checkpoint path.
  """
  import orbax.checkpoint as ocp

  target = Path(directory).absolute()
  if target.exists() and not overwrite:
    raise CheckpointError(
      f"`{target}` already exists; pass overwrite=True (CLI: --overwrite) to replace it."
    )
  target.parent.mkdir(parents=True, exist_ok=True)

  stored: dict[str, dict[str, np.ndarray]] = {}
  leaves = []
  for index, (path, keys, leaf) in enumerate(flatten_with_keys(tree)):
    if not isinstance(leaf, encoding.Encoding) and not hasattr(leaf, "dtype"):
      raise TypeError(
        f"Leaf `{path}` is a {type(leaf).__name__}; a checkpoint holds arrays and encodings "
        "only. Remove it from the tree before saving."
      )
    arrays, meta = _encode_leaf(leaf)
    slot = f"leaf_{index:05d}"
    stored[slot] = arrays
    stats = leaf_report(path, leaf).to_json()
    leaves.append(
      {
        **stats,
        "keys": list(keys),
        "slot": slot,
        "dtype": encoding.logical_dtype(leaf),
        "meta": meta,
        "arrays": {
          name: {"dtype": a.dtype.name, "shape": list(a.shape), "sha256": _checksum(a)}
          for name, a in arrays.items()
        },
      }
    )
  totals = tree_report(tree).to_json()
  manifest = {
    "format": FORMAT,
    "format_version": FORMAT_VERSION,
    "jaxshrink_version": _version(),
    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "model": model,
    "data": data,
    "recipe": recipe,
    "metrics": metrics or {},
    "leaves": leaves,
    "totals": {k: totals[k] for k in ("total_bytes", "float32_bytes", "ratio")},
  }

  staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
  try:
    ocp.PyTreeCheckpointer().save(staging / ARRAYS, stored)
    with open(staging / MANIFEST, "w") as f:
      json.dump(manifest, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    if target.exists():
      retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
      os.rename(target, retired)
      os.rename(staging, target)
      shutil.rmtree(retired, ignore_errors=True)
    else:
      os.rename(staging, target)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return target


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
  """Reads and validates only the manifest (cheap; no arrays are touched)."""
  path = Path(directory)
  if not path.is_dir():
    raise CheckpointError(f"`{path}` is not a directory; expected a jaxshrink checkpoint.")
  manifest_path = path / MANIFEST
  if not manifest_path.is_file():
    raise CheckpointError(
      f"`{path}` is not a jaxshrink checkpoint: it has no {MANIFEST}. Create one with "
      "`jaxshrink compress RECIPE --out DIR`."
    )
  try:
    manifest = json.loads(manifest_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"`{manifest_path}` is corrupt or truncated ({e}).") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise CheckpointError(f"`{manifest_path}` is not a {FORMAT} manifest.")
  version = manifest.get("format_version")
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise CheckpointError(
      f"`{path}` has format version {version!r}; this jaxshrink ({_version()}) reads up to "
      f"{FORMAT_VERSION}. Upgrade jaxshrink."
    )
  return manifest


def load(directory: str | os.PathLike, *, dense: bool = False) -> dict:
  """Loads a checkpoint as a compressed tree, or as dense float params.

  Args:
    directory: a directory written by `save`.
    dense: decode every encoding to a dense array (for unmodified models).

  Returns:
    A nested dict with the saved paths; leaves are numpy arrays or encodings.

  Raises:
    CheckpointError: missing or truncated files, failed checksums, newer format.
  """
  import orbax.checkpoint as ocp

  manifest = read_manifest(directory)
  arrays_dir = Path(directory) / ARRAYS
  try:
    stored = ocp.PyTreeCheckpointer().restore(arrays_dir.absolute())
  except Exception as e:  # orbax/tensorstore raise many types for damaged files
    raise CheckpointError(
      f"Cannot read the arrays of `{directory}` ({type(e).__name__}: {str(e)[:200]}); "
      "the checkpoint is truncated or damaged. Re-export it."
    ) from None
  entries = []
  for leaf in manifest["leaves"]:
    arrays = stored.get(leaf["slot"]) if isinstance(stored, dict) else None
    if arrays is None:
      raise CheckpointError(f"`{directory}` lacks the arrays of leaf `{leaf['path']}`.")
    arrays = {name: np.asarray(arrays.get(name)) for name in leaf["arrays"]}
    for name, info in leaf["arrays"].items():
      if _checksum(arrays[name]) != info["sha256"]:
        raise CheckpointError(
          f"Checksum mismatch in leaf `{leaf['path']}` (array `{name}`) of `{directory}`: "
          "the file is corrupted. Re-export the checkpoint."
        )
    value = _decode_leaf(leaf["meta"], arrays)
    if dense and isinstance(value, encoding.Encoding):
      value = np.asarray(value.materialize())
    entries.append((tuple(leaf["keys"]), value))
  return unflatten(entries)


def disk_bytes(directory: str | os.PathLike) -> int:
  """Bytes of every file under `directory`, manifest and orbax metadata included."""
  return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
