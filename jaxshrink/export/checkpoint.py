"""Compact checkpoints: orbax arrays plus a versioned JSON manifest.

A checkpoint directory holds

- `arrays/`: an orbax checkpoint of only the compact arrays (codes, scales,
  nonzeros, factors). Float weights that an encoding replaces are not written.
- `manifest.json`: see `manifest.py`.

Saving is atomic: everything is written into a hidden sibling directory which
replaces the target only once complete (an atomic directory exchange on Linux),
so a crash at any point leaves either the previous checkpoint or the new one,
never a half one. Loading verifies every checksum.

>>> save("out/ckpt", ctree, model="digits-cnn", data="digits")
>>> ctree = load("out/ckpt"); params = load("out/ckpt", dense=True)
"""

from __future__ import annotations

import ctypes
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxshrink import encoding
from jaxshrink.errors import CheckpointError
from jaxshrink.export.layout import checksum, decode_leaf, encode_leaf
from jaxshrink.export.manifest import ARRAYS, MANIFEST, build_manifest, read_manifest
from jaxshrink.tree import flatten_with_keys, unflatten

# (path, stored field name, stored shape) -> Sharding for that array, or None for host numpy.
ShardingFn = Callable[[str, str, tuple[int, ...]], Any]

_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
  """Atomically swaps two directory entries (Linux renameat2); False if unsupported."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd = -100
  result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
  return result == 0


def _fsync_dir(path: Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _remove_stale_staging(target: Path) -> None:
  # A writer killed mid-save leaves `.NAME.partial-*`; it never loads, so reclaim the space.
  for stale in target.parent.glob(f".{target.name}.partial-*"):
    shutil.rmtree(stale, ignore_errors=True)


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
  _remove_stale_staging(target)

  stored: dict[str, dict[str, np.ndarray]] = {}
  entries = []
  for index, (path, keys, leaf) in enumerate(flatten_with_keys(tree)):
    if not isinstance(leaf, encoding.Encoding) and not hasattr(leaf, "dtype"):
      raise TypeError(
        f"Leaf `{path}` is a {type(leaf).__name__}; a checkpoint holds arrays and encodings "
        "only. Remove it from the tree before saving."
      )
    arrays, meta = encode_leaf(leaf)
    slot = f"leaf_{index:05d}"
    stored[slot] = arrays
    entries.append((path, keys, leaf, slot, meta, arrays))
  manifest = build_manifest(tree, entries, model=model, data=data, recipe=recipe, metrics=metrics)

  staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
  try:
    ocp.PyTreeCheckpointer().save(staging / ARRAYS, stored)
    with open(staging / MANIFEST, "w") as f:
      f.write(manifest)
      f.flush()
      os.fsync(f.fileno())
    _fsync_dir(staging)
    if not target.exists():
      os.rename(staging, target)
    elif not _exchange(staging, target):
      # No atomic exchange on this platform: two renames, with a short window between them.
      retired = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
      os.rename(target, retired)
      os.rename(staging, target)
      shutil.rmtree(retired, ignore_errors=True)
    _fsync_dir(target.parent)
  finally:
    # After an exchange, `staging` holds the previous checkpoint; either way it goes.
    shutil.rmtree(staging, ignore_errors=True)
  return target


def _restore_arrays(directory: Path, manifest: dict[str, Any], shardings: ShardingFn | None):
  import orbax.checkpoint as ocp

  arrays_dir = (directory / ARRAYS).absolute()
  try:
    if shardings is None:
      return ocp.PyTreeCheckpointer().restore(arrays_dir)
    restore_args = {}
    for leaf in manifest["leaves"]:
      restore_args[leaf["slot"]] = {}
      for name, info in leaf["arrays"].items():
        sharding = shardings(leaf["path"], name, tuple(info["shape"]))
        restore_args[leaf["slot"]][name] = (
          ocp.RestoreArgs(restore_type=np.ndarray)
          if sharding is None
          else ocp.ArrayRestoreArgs(sharding=sharding)
        )
    return ocp.PyTreeCheckpointer().restore(
      arrays_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args)
    )
  except Exception as e:  # orbax/tensorstore raise many types for damaged files
    raise CheckpointError(
      f"Cannot read the arrays of `{directory}` ({type(e).__name__}: {str(e)[:200]}); "
      "the checkpoint is truncated or damaged. Re-export it."
    ) from None


def load(
  directory: str | os.PathLike,
  *,
  dense: bool = False,
  shardings: ShardingFn | None = None,
  verify: bool = True,
) -> dict:
  """Loads a checkpoint as a compressed tree, or as dense float params.

  Args:
    directory: a directory written by `save`.
    dense: decode every encoding to a dense array (for unmodified models).
    shardings: `(path, field, shape) -> Sharding | None` to restore arrays straight
      onto devices (e.g. `NamedSharding`s of a mesh) without first gathering them;
      see `jaxshrink.export.shard_like`. None restores host numpy arrays.
    verify: check every array's SHA-256 against the manifest. Sharded arrays are
      hashed from the shards this process holds, fetched to host memory.

  Returns:
    A nested dict with the saved paths; leaves are arrays or encodings.

  Raises:
    CheckpointError: missing or truncated files, failed checksums, newer format.
  """
  directory = Path(directory)
  manifest = read_manifest(directory)
  stored = _restore_arrays(directory, manifest, shardings)
  entries = []
  for leaf in manifest["leaves"]:
    arrays = stored.get(leaf["slot"]) if isinstance(stored, dict) else None
    if arrays is None or set(arrays) != set(leaf["arrays"]):
      raise CheckpointError(f"`{directory}` lacks arrays of leaf `{leaf['path']}`; re-export it.")
    if verify:
      for name, info in leaf["arrays"].items():
        host = np.asarray(jax.device_get(arrays[name]))
        if checksum(host) != info["sha256"]:
          raise CheckpointError(
            f"Checksum mismatch in leaf `{leaf['path']}` (array `{name}`) of `{directory}`: "
            "the file is corrupted. Re-export the checkpoint."
          )
    value = decode_leaf(leaf["meta"], dict(arrays))
    if dense and isinstance(value, encoding.Encoding):
      value = value.materialize()
    entries.append((tuple(leaf["keys"]), value))
  return unflatten(entries)


def disk_bytes(directory: str | os.PathLike) -> int:
  """Bytes of every file under `directory`, manifest and orbax metadata included."""
  return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
