"""Checkpoint checksums: one 64-bit digest per leaf over its data and its description.

**Data sum.** A leaf's stored arrays are hashed as one sequence of elements: the sum modulo
2**64, over every element, of `fmix64(fmix64(key + SEED) ^ v)`, where `key` is the element's
flat C-order index in its array plus `k * 2**44` for the leaf's `k`-th array (so arrays never
share keys; arrays are below 2**40 elements), `v` its bytes read as an unsigned integer
(itemsize 1, 2, 4 or 8) and `fmix64` MurmurHash3's 64-bit finalizer. `fmix64` is a bijection,
so for a given position the term is a bijection of the value: changing any one element always
changes the sum, and the key in the term catches values moved between positions; random
damage to several elements goes unnoticed with probability about 2**-64.

**Leaf digest** (manifest `sha256`): the first 64 bits of a SHA-256 over the canonical JSON
of everything that shapes the leaf's decoding (path, keys, encoding, logical shape and dtype,
static fields such as bits, group size and N:M, nested children, `stored_as`, the dtype and
shape of each stored array), the leaf's index and the number of leaves, `pack_below` (which
with the shapes fixes every array's entry and byte offset), and the data sum. `load` checks
it before decoding anything, so an edited bit width, shape, order or offset fails like a
flipped byte. A manifest is no larger for it than with a checksum of the bytes alone.

**Sharded restore.** The sum splits over any partition of the elements, so a sharded restore
is verified without gathering: every process hashes, from its own device buffers, the
addressable shards whose `replica_id` is 0 (each element of a global array lies in exactly
one such shard over all processes), with their global indices. Arrays whose shards all live
on this process are summed right there. For arrays spread over several processes one
all-gather of the partial sums (8 bytes per array and process, for all arrays at once) gives
every process the totals, so all processes verify every leaf and raise the same error. No
process ever holds more of an array than its own shards.

>>> a = np.arange(4, dtype=np.int8)
>>> as_hex(data_sum([a]))
'72b853ece1508f6a'
>>> as_hex(partial_sum(a[:2], (slice(0, 2),), (4,)) + partial_sum(a[2:], (slice(2, 4),), (4,)))
'72b853ece1508f6a'
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxshrink.errors import InvalidValueError

DIGEST_HEX = 16  # hex digits of every digest (64 bits)
_SEED = np.uint64(0x6A78736872696E6B)  # "jxshrink"
_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_BLOCK = 1 << 20  # elements hashed at a time: bounds the uint64 temporaries to 8 MiB each
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
# Manifest keys of a leaf that shape its decoding; all of them are in the leaf digest.
DECODE_KEYS = ("path", "keys", "encoding", "shape", "dtype", "static", "children", "stored_as",
               "arrays")  # fmt: skip


def _fmix64(x: np.ndarray) -> np.ndarray:
  x ^= x >> _S33
  x *= _C1
  x ^= x >> _S33
  x *= _C2
  x ^= x >> _S33
  return x


def _as_hex(value: int) -> str:
  return f"{value % (1 << 64):016x}"


ARRAY_KEY_BITS = 44  # the k-th array of a leaf hashes its elements with keys from k << 44


def partial_sum(
  values: np.ndarray, index: Sequence[slice], shape: Sequence[int], array: int = 0
) -> int:
  """The data sum over one block `values` = `whole[index]` of an array of `shape`.

  Args:
    values: host copy of the block (any layout).
    index: one slice per axis, as `Shard.index` gives them.
    shape: the whole array's shape.
    array: the array's position among its leaf's stored arrays.

  Returns:
    The sum as a Python int in `[0, 2**64)`.
  """
  values = np.asarray(values)
  if values.dtype.itemsize not in _UNSIGNED:
    raise InvalidValueError(f"cannot hash dtype {values.dtype}; itemsize must be 1, 2, 4 or 8")
  bits = np.ascontiguousarray(values).view(_UNSIGNED[values.dtype.itemsize]).reshape(-1)
  shape = tuple(int(d) for d in shape)
  strides = np.cumprod((1,) + shape[:0:-1])[::-1] if shape else np.ones(0, np.int64)
  starts = [s.indices(d)[0] for s, d in zip(index, shape, strict=True)]
  local = values.shape
  total = 0
  inner = int(np.prod(local[1:], dtype=np.int64)) if local else 1
  rows = max(1, _BLOCK // max(inner, 1))
  # Flat global index of each element of one row block: broadcast sum over the axes.
  for r0 in range(0, local[0] if local else 1, rows):
    r1 = min(r0 + rows, local[0]) if local else 1
    flat = np.zeros((r1 - r0, *local[1:]) if local else (), np.uint64)
    for axis, (start, stride) in enumerate(zip(starts, strides, strict=True)):
      lo, hi = (r0, r1) if axis == 0 else (0, local[axis])
      positions = (np.arange(lo, hi, dtype=np.uint64) + np.uint64(start)) * np.uint64(stride)
      flat += positions.reshape([-1 if a == axis else 1 for a in range(len(local))])
    flat = np.atleast_1d(flat).reshape(-1)
    block = bits[r0 * inner : r1 * inner].astype(np.uint64)
    terms = _fmix64(_fmix64(flat + np.uint64(array << ARRAY_KEY_BITS) + _SEED) ^ block)
    total += int(terms.sum(dtype=np.uint64))
  return total % (1 << 64)


def data_sum(arrays: Sequence[np.ndarray]) -> int:
  """The data sum of one leaf's stored arrays (host arrays, in storage order)."""
  total = 0
  for k, a in enumerate(arrays):
    a = np.asarray(a)
    total += partial_sum(a, tuple(slice(None) for _ in a.shape), a.shape, k)
  return total % (1 << 64)


def _sha(parts: Sequence[Any]) -> str:
  digest = hashlib.sha256()
  for part in parts:
    digest.update(json.dumps(part, sort_keys=True, separators=(",", ":")).encode())
    digest.update(b"\n")
  return digest.hexdigest()[:DIGEST_HEX]


def leaf_digest(entry: dict[str, Any], total: int, *, index: int, count: int,
                pack_below: int) -> str:  # fmt: skip
  """The leaf digest of a manifest entry as written (see the module docstring).

  Args:
    entry: the leaf's manifest entry (only its `DECODE_KEYS` are read).
    total: the leaf's data sum.
    index, count: the leaf's position in the manifest and the number of leaves.
    pack_below: the manifest's packing threshold.
  """
  record = {k: entry[k] for k in DECODE_KEYS if k in entry}
  record.setdefault("keys", entry["path"].split("/"))
  return _sha([record, index, count, pack_below, _as_hex(total)])


def sharded_sums(arrays: Sequence[Any], positions: Sequence[int]) -> list[int]:
  """The data sums of `arrays` (numpy or `jax.Array`s on any sharding), never gathered.

  `positions[i]` is `arrays[i]`'s position among its leaf's arrays (see `partial_sum`).

  Every process must call this with the same arrays and shardings: arrays spread over
  several processes are combined with one all-gather of the partial sums.
  """
  import jax

  sums, spread = [], []
  for i, a in enumerate(arrays):
    if not isinstance(a, jax.Array):
      a = np.asarray(a)
      sums.append(partial_sum(a, tuple(slice(None) for _ in a.shape), a.shape, positions[i]))
      continue
    total = 0
    for shard in a.addressable_shards:
      if shard.replica_id == 0:  # each element is in exactly one replica-0 shard
        total += partial_sum(np.asarray(shard.data), shard.index, a.shape, positions[i])
    sums.append(total % (1 << 64))
    if not a.is_fully_addressable:
      spread.append(i)
  if spread:
    from jax.experimental import multihost_utils

    # Two uint32 halves per sum: without x64, jax would truncate a uint64 to 32 bits.
    local = np.array([sums[i] for i in spread], np.uint64)
    halves = np.stack([local & np.uint64(0xFFFFFFFF), local >> np.uint64(32)], 1)
    gathered = np.asarray(multihost_utils.process_allgather(halves.astype(np.uint32)))
    totals = gathered.astype(np.uint64).reshape(-1, len(spread), 2)
    for j, i in enumerate(spread):
      sums[i] = sum(int(lo) + (int(hi) << 32) for lo, hi in totals[:, j]) % (1 << 64)
  return sums


def as_hex(value: int) -> str:
  """A digest sum as its 16 hex digits."""
  return _as_hex(value)
