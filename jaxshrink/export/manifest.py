"""The checkpoint manifest: a versioned JSON description of every stored leaf.

On disk (`manifest.json`, compact JSON) it records the format and jaxshrink
versions, the model and data sources, the recipe and measured metrics, the
packing threshold of `storage.py`, and per leaf, in storage order:

- `path`, and `keys` only where they are not the path's `/`-split strings
  (nnx integer keys);
- `encoding` (absent for a plain array), logical `shape` and `dtype`, the `static`
  fields that differ from the encoding's defaults (code bits, group size, N:M, ...),
  the `children` of nested encodings and `stored_as` for arrays kept in a denser
  form than in memory (`nm_ranks`);
- `sparsity` (only when not 0) and `sha256`: 64 bits of a SHA-256 over everything that
  shapes the leaf's decoding, its place in the layout and its data (`digest.py`);
- `arrays`: `{field: [dtype, shape]}` in storage order (a plain array's one array
  is its shape and dtype).

`read_manifest` refuses a manifest larger than `MAX_MANIFEST_BYTES` and checks the type and
bounds of every field (`validate.py`) before any array file is opened; `load` checks the
digests before decoding.

Everything derivable is left out of the file and added by `read_manifest`: per
leaf `bytes`, `bits_per_weight`, `description` and `meta` (what `decode_leaf`
reads), and the `totals`. `inspect` reads only this file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxshrink.errors import CheckpointError, InvalidValueError
from jaxshrink.export import storage
from jaxshrink.export.digest import DECODE_KEYS, leaf_digest
from jaxshrink.export.layout import DENSE, decode_leaf
from jaxshrink.export.validate import check_manifest

FORMAT = "jaxshrink-checkpoint"
FORMAT_VERSION = 3  # 3: the leaf digest covers decode metadata and layout; summable by shard
# 2: packed small arrays, raw zarr entries, one checksum per leaf over the array bytes only
MAX_MANIFEST_BYTES = 64 << 20  # a manifest of 100k leaves is about 30 MiB
MANIFEST = "manifest.json"
ARRAYS = "arrays"
_META_KEYS = ("encoding", "shape", "dtype", "static", "children", "stored_as")


def _version() -> str:
  from jaxshrink import __version__

  return __version__


def leaf_entry(
  path: str,
  keys: tuple,
  meta: dict[str, Any],
  arrays: dict[str, np.ndarray],
  *,
  sparsity: float,
) -> dict[str, Any]:
  """One leaf's manifest record (see the module docstring), `sha256` set by `build_manifest`."""
  entry: dict[str, Any] = {"path": path}
  if list(keys) != path.split("/"):
    entry["keys"] = list(keys)
  entry.update(meta)
  if sparsity:
    entry["sparsity"] = round(sparsity, 3)
  if meta["encoding"] == DENSE:  # a plain array: its one array is the shape and dtype
    del entry["encoding"]
  else:
    entry["arrays"] = {name: [a.dtype.name, list(a.shape)] for name, a in arrays.items()}
  return entry


def build_manifest(leaves, sums, *, model, data, recipe, metrics) -> str:
  """The manifest JSON text for `leaves` made by `leaf_entry`, with their data `sums`."""
  for index, (leaf, total) in enumerate(zip(leaves, sums, strict=True)):
    leaf["sha256"] = leaf_digest(leaf, total, index=index, count=len(leaves),
                                 pack_below=storage.PACK_BELOW)  # fmt: skip
  manifest = {
    "format": FORMAT,
    "format_version": FORMAT_VERSION,
    "jaxshrink_version": _version(),
    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "model": model,
    "data": data,
    "recipe": recipe,
    "metrics": metrics or {},
    "pack_below": storage.PACK_BELOW,
    "leaves": leaves,
  }
  # Compact separators: on a small model the manifest is a visible share of the checkpoint.
  return json.dumps(manifest, separators=(",", ":"))


def leaf_arrays(leaf: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
  """`{field: (dtype, shape)}` of one manifest leaf, in storage order."""
  if "arrays" not in leaf:
    return {"value": (leaf["dtype"], tuple(leaf["shape"]))}
  return {name: (dtype, tuple(shape)) for name, (dtype, shape) in leaf["arrays"].items()}


def placements(manifest: dict[str, Any]) -> list[list[storage.StoredArray]]:
  """Per leaf, where each of its arrays is stored (see `storage.plan`)."""
  specs = [leaf_arrays(leaf) for leaf in manifest["leaves"]]
  flat, _ = storage.plan(
    [spec for arrays in specs for spec in arrays.values()], manifest["pack_below"]
  )
  out, i = [], 0
  for arrays in specs:
    out.append(flat[i : i + len(arrays)])
    i += len(arrays)
  return out


def _describe(leaf: dict[str, Any]) -> str:
  if leaf["encoding"] == DENSE:
    return leaf["dtype"]
  abstract = {
    name: jax.ShapeDtypeStruct(shape, np.dtype(dtype))
    for name, (dtype, shape) in leaf_arrays(leaf).items()
  }
  try:
    return decode_leaf(leaf["meta"], abstract).describe()
  except Exception:  # an encoding whose describe() needs values: its name will do
    return leaf["encoding"]


def _derive(manifest: dict[str, Any]) -> None:
  # What the file leaves out because it follows from the rest (see the module docstring).
  total = float32 = 0
  for leaf in manifest["leaves"]:
    leaf.setdefault("encoding", DENSE)
    leaf["meta"] = {k: leaf[k] for k in _META_KEYS if k in leaf}  # what `decode_leaf` reads
    leaf.setdefault("keys", leaf["path"].split("/"))
    size = int(np.prod(leaf["shape"], dtype=np.int64))
    nbytes = sum(
      int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
      for dtype, shape in leaf_arrays(leaf).values()
    )
    leaf["bytes"] = nbytes
    leaf["bits_per_weight"] = round(8.0 * nbytes / max(size, 1), 4)
    leaf["description"] = _describe(leaf)
    leaf.setdefault("sparsity", 0.0)
    if leaf["encoding"] == DENSE:
      leaf["encoding"] = leaf["dtype"]  # reports name a dense leaf by its dtype
    total += nbytes
    float32 += 4 * size
  manifest["totals"] = {
    "total_bytes": total,
    "float32_bytes": float32,
    "ratio": round(float32 / max(total, 1), 4),
  }


def _finite(text: str) -> float:
  value = float(text)
  if value != value or value in (float("inf"), float("-inf")):
    raise InvalidValueError(f"non-finite number {text}")
  return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  out = dict(pairs)
  if len(out) != len(pairs):
    raise InvalidValueError("duplicate keys in one object")
  return out


def _reject_constant(name: str):
  raise InvalidValueError(f"{name} is not JSON")


def _parse(manifest_path: Path) -> Any:
  """The JSON of a manifest, refusing what could exhaust memory or time."""
  try:
    with open(manifest_path, "rb") as f:
      raw = f.read(MAX_MANIFEST_BYTES + 1)
  except OSError as e:
    raise CheckpointError(f"Cannot read `{manifest_path}` ({e.strerror}).") from None
  if len(raw) > MAX_MANIFEST_BYTES:
    raise CheckpointError(
      f"`{manifest_path}` is larger than {MAX_MANIFEST_BYTES} bytes; no jaxshrink manifest is. "
      "The file is damaged or not a jaxshrink manifest."
    )
  try:
    return json.loads(raw.decode("utf-8"), parse_float=_finite, parse_constant=_reject_constant,
                      object_pairs_hook=_no_duplicates)  # fmt: skip
  except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
    raise CheckpointError(
      f"`{manifest_path}` is corrupt or truncated ({type(e).__name__}: {str(e)[:120]})."
    ) from None


def read_manifest(directory) -> dict[str, Any]:
  """Reads and validates only the manifest (cheap; no array file is opened).

  Returns:
    The manifest dict, with the derived per-leaf `bytes`, `description`, `keys`, `sparsity`
    and the `totals` added.

  Raises:
    CheckpointError: not a checkpoint, a damaged or oversized manifest, a field of the wrong
      type or out of bounds, or another format version.
  """
  path = Path(directory)
  if not path.is_dir():
    raise CheckpointError(f"`{path}` is not a directory; expected a jaxshrink checkpoint.")
  manifest_path = path / MANIFEST
  if not manifest_path.is_file():
    raise CheckpointError(
      f"`{path}` is not a jaxshrink checkpoint: it has no {MANIFEST}. Create one with "
      "`jaxshrink compress RECIPE --out DIR`."
    )
  manifest = _parse(manifest_path)
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise CheckpointError(f"`{manifest_path}` is not a {FORMAT} manifest.")
  version = manifest.get("format_version")
  if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
    raise CheckpointError(
      f"`{path}` has format version {version!r}; this jaxshrink ({_version()}) reads up to "
      f"{FORMAT_VERSION}. Upgrade jaxshrink."
    )
  if version < FORMAT_VERSION:
    # Older checksums cover only array bytes, not what shapes decoding: not verifiable here.
    raise CheckpointError(
      f"`{path}` has format version {version}, whose checksums do not cover the metadata that "
      f"shapes decoding (version {FORMAT_VERSION} does); re-export it from its recipe with this "
      "jaxshrink."
    )
  check_manifest(manifest, f"`{manifest_path}`")
  # What the leaf digests cover, as written (`_derive` adds to the entries).
  manifest["decode_records"] = [
    {k: leaf[k] for k in DECODE_KEYS if k in leaf} for leaf in manifest["leaves"]
  ]
  try:
    _derive(manifest)
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(
      f"`{manifest_path}` has a malformed leaf ({type(e).__name__}: {e}); the file is damaged."
    ) from None
  return manifest


def check_matches(manifest: dict[str, Any], expected: dict[str, tuple[int, ...]], *, what: str):
  """Raises unless the manifest's leaf paths and logical shapes equal `expected`.

  Args:
    manifest: from `read_manifest`.
    expected: `{path: shape}` of the model the checkpoint is loaded into.
    what: the model's name, for the message.
  """
  stored = {leaf["path"]: tuple(leaf["shape"]) for leaf in manifest["leaves"]}
  missing = sorted(set(expected) - set(stored))
  extra = sorted(set(stored) - set(expected))
  wrong = sorted(p for p in set(stored) & set(expected) if stored[p] != tuple(expected[p]))
  if missing or extra or wrong:
    parts = []
    if missing:
      parts.append(f"missing {', '.join(missing[:8])}")
    if extra:
      parts.append(f"unexpected {', '.join(extra[:8])}")
    if wrong:
      parts.append(
        "shape mismatch " + ", ".join(f"{p} {stored[p]} != {tuple(expected[p])}" for p in wrong[:8])
      )
    raise CheckpointError(
      f"The checkpoint's leaves do not match model `{what}`: {'; '.join(parts)}. Evaluate it "
      "with the model it was compressed from."
    )
