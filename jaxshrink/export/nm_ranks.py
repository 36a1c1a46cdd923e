"""N:M index metadata at its information limit, for checkpoints.

`NMSparse` keeps, per group of `m`, the positions of its `n` values, `ceil(log2 m)`
bits each (2:4: 4 bits per group), which is what a kernel unpacks fastest. But
a group's positions are one of only `C(m, n)` patterns (2:4: 6), so a checkpoint
stores each group's pattern rank instead, several ranks per word as base-`C(m, n)`
digits: three 2:4 groups per byte, 2.67 bits per group where `log2 6 = 2.58` is
the limit. `decode` gives back the encoding's own packed positions, bit for bit.

>>> stored = encode(indices, n=2, m=4, groups=64, cols=256)  # None if it cannot help
>>> np.array_equal(decode(stored, n=2, m=4, groups=64, cols=256), indices)
True
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

from jaxshrink.errors import InvalidValueError
from jaxshrink.sparsity.encodings import index_bits, pack_small, unpack_small

NAME = "nm-ranks"  # recorded in the manifest for a transcoded `indices` array
MAX_M = 16  # pattern lookup tables have 2**m entries


@functools.cache
def _tables(n: int, m: int):
  patterns = np.array(list(itertools.combinations(range(m), n)), np.int64).reshape(-1, n)
  rank_of_mask = np.full(1 << m, -1, np.int64)
  rank_of_mask[(1 << patterns).sum(axis=1)] = np.arange(len(patterns))
  count = len(patterns)
  # The word (bytes, ranks per word) with the fewest bits per rank.
  best = None
  for nbytes in (1, 2, 4, 8):
    per = 0
    while count ** (per + 1) <= 1 << (8 * nbytes):
      per += 1
    if per and (best is None or 8 * nbytes / per < 8 * best[0] / best[1]):
      best = (nbytes, per)
  return patterns, rank_of_mask, count, best


def encode(indices: np.ndarray, *, n: int, m: int, groups: int, cols: int) -> np.ndarray | None:
  """Pattern ranks of `NMSparse.indices` as packed uint8, or None when not applicable.

  None (store the positions as they are) when `m` is too large for a lookup table,
  when a group's positions are not distinct and sorted, or when the ranks would not
  decode to the very same bytes.
  """
  if m > MAX_M or not 0 < n < m:
    return None
  indices = np.asarray(indices)
  # NMSparse's own packing of the positions (host copy, int64 for the mask sums below).
  positions = np.asarray(unpack_small(indices, index_bits(m), groups * n * cols), np.int64)
  positions = positions.reshape(groups, n, cols).transpose(0, 2, 1).reshape(-1, n)
  patterns, rank_of_mask, count, (nbytes, per) = _tables(n, m)
  ranks = rank_of_mask[(1 << positions).sum(axis=1)] if positions.size else np.zeros(0, np.int64)
  if (ranks < 0).any() or not np.array_equal(patterns[ranks], positions):
    return None
  ranks = np.concatenate([ranks, np.zeros((-ranks.size) % per, np.int64)]).reshape(-1, per)
  words = np.zeros(ranks.shape[0], np.uint64)
  for i in range(per - 1, -1, -1):  # Horner: the first rank is the lowest digit
    words = words * np.uint64(count) + ranks[:, i].astype(np.uint64)
  stored = words.astype(f"<u{nbytes}").view(np.uint8)
  if not np.array_equal(decode(stored, n=n, m=m, groups=groups, cols=cols), indices):
    return None
  return stored


def stored_size(*, n: int, m: int, count: int) -> int:
  """Bytes `encode` stores for `count` groups (`groups * cols`) of an `n:m` pattern."""
  if not 0 < n < m <= MAX_M:
    raise InvalidValueError(f"pattern ranks need 0 < n < m <= {MAX_M}; got n={n}, m={m}")
  _, _, _, (nbytes, per) = _tables(n, m)
  return -(-count // per) * nbytes


def decode(stored: np.ndarray, *, n: int, m: int, groups: int, cols: int) -> np.ndarray:
  """`NMSparse.indices` (packed positions) from `encode`'s output.

  Raises:
    ValueError: `m` beyond the lookup tables, a stored size other than `stored_size`, or a
      rank that names no pattern.
  """
  stored = np.ascontiguousarray(stored, np.uint8).reshape(-1)
  if stored.size != stored_size(n=n, m=m, count=groups * cols):
    raise InvalidValueError(
      f"{stored.size} bytes of pattern ranks; {groups * cols} groups need "
      f"{stored_size(n=n, m=m, count=groups * cols)}"
    )
  patterns, _, count, (nbytes, per) = _tables(n, m)
  words = stored.view(f"<u{nbytes}").astype(np.uint64)
  digits = np.empty((words.size, per), np.int64)
  for i in range(per):
    digits[:, i] = (words % np.uint64(count)).astype(np.int64)
    words = words // np.uint64(count)
  ranks = digits.reshape(-1)[: groups * cols]
  if ranks.size and int(ranks.max()) >= count:
    raise InvalidValueError(f"pattern rank {int(ranks.max())} out of range; {n}:{m} has {count}")
  positions = patterns[ranks].reshape(groups, cols, n).transpose(0, 2, 1)
  return pack_small(positions, index_bits(m))
