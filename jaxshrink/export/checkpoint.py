"""Compact checkpoints: orbax arrays plus a versioned JSON manifest.

A checkpoint directory holds

- `arrays/`: an orbax checkpoint of only the compact arrays (codes, scales,
  nonzeros, factors). Float weights that an encoding replaces are not written.
- `manifest.json`: see `manifest.py`.

Saving is atomic: everything is written into a hidden sibling directory which
replaces the target only once complete (an atomic directory exchange on Linux),
so a crash at any point leaves either the previous checkpoint or the new one,
never a half one. `overwrite=True` replaces only an existing checkpoint or an empty
directory (`overwrite.py`). Loading checks the manifest, then every array's digest
(`digest.py`); a sharded restore hashes only the shards each process holds.

>>> save("out/ckpt", ctree, model="digits-cnn", data="digits")
>>> ctree = load("out/ckpt"); params = load("out/ckpt", dense=True)
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxshrink import encoding
from jaxshrink.errors import CheckpointError, InvalidTypeError, InvalidValueError
from jaxshrink.export import storage
from jaxshrink.export.digest import data_sum, leaf_digest, sharded_sums
from jaxshrink.export.layout import decode_leaf, encode_leaf
from jaxshrink.export.manifest import (
  ARRAYS,
  MANIFEST,
  build_manifest,
  leaf_arrays,
  leaf_entry,
  placements,
  read_manifest,
)
from jaxshrink.export.overwrite import (
  MARKER,
  check_overwrite,
  make_staging,
  remove_stale_staging,
  staging_name,
)
from jaxshrink.export.validate import check_manifest
from jaxshrink.model import as_tree, rebuild
from jaxshrink.report import leaf_report
from jaxshrink.tree import flatten_to_store, unflatten

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
    tree: param tree whose leaves are arrays or `Encoding`s, or a model holding one (an nnx
      module, a `Compressed` one, `Linen(module, variables)`: `jaxshrink.model`); every
      collection (`batch_stats`, ...) is kept.
    model, data: the sources the tree was made with, recorded for information. `eval`
      rebuilds zoo names (with literal overrides) from them; a `module:factory` is never
      imported from a checkpoint, the user passes it (`jaxshrink eval DIR --model ...`).
    recipe: the recipe that produced the tree, recorded verbatim.
    metrics: measured metrics of the compress run, recorded verbatim.
    overwrite: replace an existing checkpoint (or empty directory) at `directory`; anything
      else there is refused and left untouched.

  Returns:
    The checkpoint path.

  Raises:
    CheckpointError: `directory` exists and `overwrite` is False.
    UsageError: `overwrite` is True but `directory` is a symlink, a file, or a non-empty
      directory that is not a jaxshrink checkpoint (checked before any work is done).
    TypeError: a leaf is neither an array nor an `Encoding`.
    ValueError: a leaf whose dtype or encoding a checkpoint cannot describe.
  """
  target = Path(directory).absolute()
  if (target.exists() or target.is_symlink()) and not overwrite:
    raise CheckpointError(
      f"`{target}` already exists; pass overwrite=True (CLI: --overwrite) to replace it."
    )
  check_overwrite(target)
  tree = as_tree(tree)
  # Multi-host: every process calls save with the same tree. Sharded arrays are gathered to
  # host copies (a collective), every process joins orbax's write of one staging directory,
  # and process 0 alone writes the manifest and renames; the others wait on a barrier.
  primary = jax.process_index() == 0
  tree = _gather_to_host(tree)

  stored: list[np.ndarray] = []
  leaves, sums = [], []
  for path, keys, leaf in flatten_to_store(tree):
    if not isinstance(leaf, encoding.Encoding) and not hasattr(leaf, "dtype"):
      raise InvalidTypeError(
        f"Leaf `{path}` is a {type(leaf).__name__}; a checkpoint holds arrays and encodings "
        "only. Remove it from the tree before saving."
      )
    arrays, meta = encode_leaf(leaf, compact=True)
    stored.extend(arrays.values())
    sparsity = leaf_report(path, leaf).sparsity
    sums.append(data_sum(list(arrays.values())))
    leaves.append(leaf_entry(path, keys, meta, arrays, sparsity=sparsity))
  manifest = build_manifest(leaves, sums, model=model, data=data, recipe=recipe, metrics=metrics)
  try:  # what load would refuse is refused here, before anything is written
    check_manifest(json.loads(manifest), "this tree")
  except CheckpointError as e:
    raise InvalidValueError(f"Cannot save a loadable checkpoint: {e}") from None

  suffix = uuid.uuid4().hex[:8] if jax.process_count() == 1 else f"multihost{jax.process_count()}"
  staging = target.parent / staging_name(target, suffix)
  if primary:
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)  # a writer killed mid-save left it; it never loads
    make_staging(staging)
  _barrier("jaxshrink.export.save.start")
  try:
    storage.write(staging / ARRAYS, stored)
    if not primary:
      return target
    with open(staging / MANIFEST, "w") as f:
      f.write(manifest)
      f.flush()
      os.fsync(f.fileno())
    (staging / MARKER).unlink()  # a complete checkpoint now; its manifest marks it as ours
    _fsync_dir(staging)
    check_overwrite(target)  # again, right before replacing: the target may have changed
    if not target.exists():
      os.rename(staging, target)
    elif not _exchange(staging, target):
      # No atomic exchange on this platform: two renames, with a short window between them.
      retired = target.parent / staging_name(target, uuid.uuid4().hex[:8])
      os.rename(target, retired)
      os.rename(staging, target)
      shutil.rmtree(retired, ignore_errors=True)
    _fsync_dir(target.parent)
  finally:
    # After an exchange, `staging` holds the previous checkpoint; either way it goes.
    if primary:
      shutil.rmtree(staging, ignore_errors=True)
    _barrier("jaxshrink.export.save.done")
  return target


def _gather_to_host(tree: Any) -> Any:
  """Host copies of arrays spread over several processes (a collective on every process)."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils

  def gather(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return multihost_utils.process_allgather(x, tiled=True)
    return x

  return jax.tree.map(gather, tree)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _select(manifest: dict[str, Any], leaves: Sequence[str] | None, directory: Path) -> list[int]:
  paths = [leaf["path"] for leaf in manifest["leaves"]]
  if leaves is None:
    return list(range(len(paths)))
  if isinstance(leaves, str):
    raise InvalidTypeError(f"`leaves` must be a list of leaf paths, not the string {leaves!r}.")
  index = {p: i for i, p in enumerate(paths)}
  unknown = [p for p in leaves if p not in index]
  if unknown:
    raise CheckpointError(
      f"`{directory}` has no leaf {', '.join(map(repr, unknown[:8]))}; its leaves are "
      f"{', '.join(paths[:12])}{' ...' if len(paths) > 12 else ''}. Pass paths from "
      "`jaxshrink inspect`."
    )
  return sorted({index[p] for p in leaves})


def load(
  directory: str | os.PathLike,
  *,
  dense: bool = False,
  shardings: ShardingFn | None = None,
  verify: bool = True,
  leaves: Sequence[str] | None = None,
  like: Any = None,
) -> Any:
  """Loads a checkpoint as a compressed tree, or as dense float params.

  Args:
    directory: a directory written by `save`.
    dense: decode every encoding to a dense array (for unmodified models).
    shardings: `(path, field, shape) -> Sharding | None` to restore arrays straight
      onto devices (e.g. `NamedSharding`s of a mesh) without first gathering them;
      see `jaxshrink.export.shard_like`. None restores host numpy arrays.
    verify: check every loaded leaf's digest, which covers its arrays and every manifest
      field that shapes its decoding. A sharded array is hashed shard by shard from the
      buffers this process holds, never gathered (see `digest.py`); every process must then
      call `load` alike. The manifest's types and bounds are checked whatever `verify` says.
    leaves: leaf paths to load (e.g. `["dense1/kernel"]`); only their array files are
      read. None loads every leaf.
    like: the model the checkpoint was saved from (or one built alike: the checkpoint
      never names code): the tree comes back in its form (`jaxshrink.model.rebuild`): a
      `Compressed` nnx module (your module class when nothing is encoded, e.g. `dense=True`)
      or `Linen(module, variables)`. None returns the tree.

  Returns:
    A nested dict with the saved (or selected) paths; leaves are arrays or encodings. With
    `like`, the model holding it.

  Raises:
    CheckpointError: missing or truncated files, failed checksums, a manifest field of the
      wrong type or out of bounds, another format version, unknown leaf paths in `leaves`.

  >>> load("out/ckpt", leaves=["dense1/kernel"])["dense1"]["kernel"].describe()
  'int8 per-channel sym'
  """
  directory = Path(directory)
  manifest = read_manifest(directory)
  selected = _select(manifest, leaves, directory)
  where = placements(manifest)
  flat, owner = [], []
  for i in selected:
    leaf = manifest["leaves"][i]
    for k, (name, placement) in enumerate(zip(leaf_arrays(leaf), where[i], strict=True)):
      flat.append(placement)
      owner.append((leaf, name, k))

  def sharding_of(j: int):
    leaf, name, _ = owner[j]
    return shardings(leaf["path"], name, flat[j].shape)

  try:
    restored = storage.read(
      directory / ARRAYS, flat, range(len(flat)), None if shardings is None else sharding_of
    )
  except Exception as e:  # orbax/tensorstore raise many types for damaged files
    raise CheckpointError(
      f"Cannot read the arrays of `{directory}` ({type(e).__name__}: {str(e)[:200]}); "
      "the checkpoint is truncated or damaged. Re-export it."
    ) from None
  for j, (leaf, name, _) in enumerate(owner):
    got, want = restored[j], flat[j]
    if tuple(got.shape) != want.shape or np.dtype(got.dtype) != np.dtype(want.dtype):
      if isinstance(got, jax.Array) and jax.dtypes.canonicalize_dtype(want.dtype) == got.dtype:
        raise CheckpointError(
          f"Array `{name}` of leaf `{leaf['path']}` in `{directory}` is {want.dtype}, which "
          f"JAX holds as {got.dtype} without `jax_enable_x64`; enable it or restore this leaf "
          "without `shardings`."
        )
      raise CheckpointError(
        f"Array `{name}` of leaf `{leaf['path']}` in `{directory}` is stored as {got.dtype} "
        f"{tuple(got.shape)}; the manifest says {want.dtype} {want.shape}. The checkpoint is "
        "damaged: re-export it."
      )
  if verify:
    sums = sharded_sums([restored[j] for j in range(len(flat))], [k for *_, k in owner])
    totals: dict[str, int] = {}
    for j, (leaf, _, _) in enumerate(owner):
      totals[leaf["path"]] = totals.get(leaf["path"], 0) + sums[j]
    count = len(manifest["leaves"])
    for i in selected:
      leaf, record = manifest["leaves"][i], manifest["decode_records"][i]
      expected = leaf_digest(record, totals.get(leaf["path"], 0), index=i, count=count,
                             pack_below=manifest["pack_below"])  # fmt: skip
      if expected != leaf["sha256"]:
        raise CheckpointError(
          f"Checksum mismatch in leaf `{leaf['path']}` of `{directory}`: its arrays, or the "
          "manifest's description of them (encoding, shapes, bits, layout), were changed or "
          "damaged. Re-export the checkpoint."
        )
  by_leaf: dict[str, dict[str, Any]] = {}
  for j, (leaf, name, _) in enumerate(owner):
    by_leaf.setdefault(leaf["path"], {})[name] = restored[j]
  entries = []
  for i in selected:
    leaf = manifest["leaves"][i]
    try:
      value = decode_leaf(leaf["meta"], by_leaf.get(leaf["path"], {}))
      if dense and isinstance(value, encoding.Encoding):
        value = value.materialize()
    except Exception as e:  # validated above; anything left is damage the checks missed
      raise CheckpointError(
        f"Cannot decode leaf `{leaf['path']}` of `{directory}` ({type(e).__name__}: "
        f"{str(e)[:200]}). Re-export the checkpoint."
      ) from None
    entries.append((tuple(leaf["keys"]), value))
  return unflatten(entries) if like is None else rebuild(like, unflatten(entries))


def disk_bytes(directory: str | os.PathLike) -> int:
  """Bytes of every file under `directory`, manifest and orbax metadata included."""
  return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
