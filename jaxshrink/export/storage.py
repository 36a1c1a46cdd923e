"""The orbax side of a checkpoint: which stored array lives in which orbax entry.

Every array a checkpoint stores (codes, scales, nonzeros, factors, biases) is
listed in the manifest in a fixed order, with its dtype and shape. An array of
`PACK_BELOW` bytes or more is its own orbax entry (`a0`, `a1`, ... in that
order), so it can be restored alone and straight onto a mesh. The smaller ones
(scales, biases, zero points, index metadata) are concatenated, in the same
order and without padding, into one `uint8` entry `packed`: per-entry orbax
metadata would otherwise cost more than those arrays themselves.

Entries are written raw (zarr v2, no compression, no OCDBT): packed codes do
not compress, raw chunks make the bytes on disk equal the information in the
encodings, and each array is one file that can be read alone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxshrink.errors import InvalidValueError

PACK_BELOW = 1 << 20  # bytes; smaller arrays share the `packed` entry
PACKED = "packed"
# Orbax bookkeeping that restoring never reads (a timestamp and a commit marker).
_UNUSED_ORBAX_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")


@dataclasses.dataclass(frozen=True)
class StoredArray:
  """Where one stored array lives.

  Attributes:
    dtype, shape: of the array.
    entry: the orbax entry name (`a<N>` or `packed`).
    offset: byte offset inside `packed` (0 for an own entry).
  """

  dtype: str
  shape: tuple[int, ...]
  entry: str
  offset: int

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def plan(specs: Sequence[tuple[str, Sequence[int]]], pack_below: int = PACK_BELOW):
  """Assigns every `(dtype, shape)`, in order, to an orbax entry.

  Returns:
    `(placements, packed_nbytes)`: one `StoredArray` per spec and the size of `packed`.
  """
  placements, own, offset = [], 0, 0
  for dtype, shape in specs:
    shape = tuple(int(d) for d in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if nbytes >= pack_below:
      placements.append(StoredArray(dtype, shape, f"a{own}", 0))
      own += 1
    else:
      placements.append(StoredArray(dtype, shape, PACKED, offset))
      offset += nbytes
  return placements, offset


class _QuietMerge(logging.Filter):
  # orbax warns on every save without OCDBT that it has no OCDBT parts to merge.
  def filter(self, record: logging.LogRecord) -> bool:
    return "Skipping merge of OCDBT" not in record.getMessage()


def _handler():
  import orbax.checkpoint as ocp

  return ocp.Checkpointer(
    ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False, use_compression=False)
  )


def write(directory: Path, arrays: Sequence[np.ndarray], pack_below: int = PACK_BELOW) -> None:
  """Writes `arrays` (in manifest order) as one orbax checkpoint at `directory`."""
  placements, packed_nbytes = plan([(a.dtype.name, a.shape) for a in arrays], pack_below)
  entries: dict[str, np.ndarray] = {}
  packed = np.empty(packed_nbytes, np.uint8)
  for array, where in zip(arrays, placements, strict=True):
    if where.entry == PACKED:
      raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
      packed[where.offset : where.offset + where.nbytes] = raw
    else:
      entries[where.entry] = np.ascontiguousarray(array)
  if packed_nbytes:
    entries[PACKED] = packed
  quiet = _QuietMerge()
  logger = logging.getLogger("absl")
  logger.addFilter(quiet)
  try:
    _handler().save(directory, entries)
  finally:
    logger.removeFilter(quiet)
  for name in _UNUSED_ORBAX_FILES:
    (directory / name).unlink(missing_ok=True)


def read(
  directory: Path,
  placements: Sequence[StoredArray],
  wanted: Sequence[int],
  sharding_of: Callable[[int], Any] | None = None,
) -> dict[int, Any]:
  """Restores the arrays at indices `wanted` of `placements`; only their entries are read.

  Args:
    directory: the orbax directory written by `write`.
    placements: from `plan`, for every stored array of the checkpoint.
    wanted: indices into `placements`.
    sharding_of: index -> `jax.sharding.Sharding` or None (host numpy). Arrays of own entries
      are read shard by shard straight onto their devices; packed ones are sliced from the
      small `packed` entry on the host and then placed.

  Returns:
    `{index: array}`.
  """
  import jax
  import orbax.checkpoint as ocp

  restore_args: dict[str, Any] = {}
  for i in wanted:
    where = placements[i]
    if where.entry == PACKED and where.nbytes == 0:
      continue  # an empty array has no bytes in `packed` (which may not exist)
    sharding = None if sharding_of is None or where.entry == PACKED else sharding_of(i)
    restore_args[where.entry] = (
      ocp.RestoreArgs(restore_type=np.ndarray)
      if sharding is None
      else ocp.ArrayRestoreArgs(sharding=sharding)
    )
  if not restore_args:
    restored = {}
  else:
    restored = _handler().restore(
      directory,
      args=ocp.args.PyTreeRestore(
        item={name: 0 for name in restore_args}, restore_args=restore_args, partial_restore=True
      ),
    )
  out = {}
  for i in wanted:
    where = placements[i]
    if where.entry != PACKED:
      out[i] = restored[where.entry]
      if not hasattr(out[i], "shape"):  # orbax hands back the placeholder of a missing entry
        raise InvalidValueError(f"orbax entry `{where.entry}` is missing")
      continue
    packed = np.asarray(restored[PACKED]) if where.nbytes else np.empty(0, np.uint8)
    raw = packed[where.offset : where.offset + where.nbytes]
    if raw.size != where.nbytes:
      raise InvalidValueError(f"`{PACKED}` holds {packed.size} bytes; the manifest needs more")
    host = raw.copy().view(np.dtype(where.dtype)).reshape(where.shape)
    sharding = None if sharding_of is None else sharding_of(i)
    if sharding is not None:
      host = jax.make_array_from_callback(host.shape, sharding, lambda index, h=host: h[index])
    out[i] = host
  return out
