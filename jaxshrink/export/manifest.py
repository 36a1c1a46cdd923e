"""The checkpoint manifest: a versioned JSON description of every stored leaf.

It records the format and jaxshrink versions, the model and data sources, the
recipe and measured metrics, totals, and per leaf: path, key components (so
nnx integer keys survive), encoding with its static fields, logical shape and
dtype, size stats, and the dtype, shape and SHA-256 of each stored array.
`inspect` reads only this file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from jaxshrink import encoding
from jaxshrink.errors import CheckpointError
from jaxshrink.export.layout import checksum
from jaxshrink.report import leaf_report, tree_report

FORMAT = "jaxshrink-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = "arrays"


def _version() -> str:
  from jaxshrink import __version__

  return __version__


def build_manifest(tree, entries, *, model, data, recipe, metrics) -> str:
  """The manifest JSON text for `entries` of (path, keys, leaf, slot, meta, arrays)."""
  leaves = []
  for path, keys, leaf, slot, meta, arrays in entries:
    leaves.append(
      {
        **leaf_report(path, leaf).to_json(),
        "keys": list(keys),
        "slot": slot,
        "dtype": encoding.logical_dtype(leaf),
        "meta": meta,
        "arrays": {
          name: {"dtype": a.dtype.name, "shape": list(a.shape), "sha256": checksum(a)}
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
  # Compact separators: on a small model the manifest is a visible share of the checkpoint.
  return json.dumps(manifest, separators=(",", ":"))


def read_manifest(directory) -> dict[str, Any]:
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
  if not isinstance(manifest.get("leaves"), list):
    raise CheckpointError(f"`{manifest_path}` has no leaf list; the file is damaged.")
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
