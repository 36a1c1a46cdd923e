"""The transfer data of `recover`: its batches, and the teacher's outputs kept for reuse.

A recovery run reads each transfer example several times (4000 steps of 32 over the corpus'
21,807 sentences read each one about six times), and the float teacher's outputs for an example
never change: no parameter of the teacher trains. `TeacherCache` keeps them the first time an
example is seen, so later epochs train the student alone, which saves the teacher's forward pass
(for a 3-layer student of a 6-layer teacher, about 40% of a step's work).

What is kept, and how:
- per-example outputs (`(B, ...)`: pooled embeddings, classifier logits) as they are;
- per-token outputs (`(B, T, ...)` hidden states of token ids) at the real tokens only, as
  bfloat16: they only ever serve as the targets of feature losses that leave padding out (`recover`
  passes the token mask), so the padded positions are rebuilt as zeros. bfloat16 halves the
  memory; a hidden-state target rounded to 8 mantissa bits moves a token's cosine by about 1e-5.

The cache is off when it cannot be exact or does not pay: augmented batches (the teacher sees a
new input each step), per-token logits (their loss counts every position), a run that reads each
example once at most, or more than `CACHE_BYTES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes
import numpy as np

# Token batches are cut to the longest row they hold, rounded up to a multiple of this: a few
# compiled shapes instead of one per length, and short sentences cost short sequences.
TOKEN_BUCKET = 8
# Largest teacher cache `recover` keeps unasked: the MiniLM low-rank recipe's six hidden states of
# the 21,807-sentence corpus take 1.8 GB.
CACHE_BYTES = 4 << 30
TOKEN_DTYPE = np.dtype(ml_dtypes.bfloat16)


def token_batches(
  ids: np.ndarray,
  steps: int,
  batch_size: int,
  seed: int,
  *,
  pad_id: int,
  bucket: int = TOKEN_BUCKET,
) -> list[np.ndarray]:
  """`steps` index batches over `(N, T)` token rows, each drawn from rows of similar length.

  Rows are grouped by their length (last non-`pad_id` position) rounded up to `bucket`; each
  group is cut into batches of fresh permutations, and the batches of all groups are shuffled
  together, so a group is visited in proportion to its size.
  """
  ids = np.asarray(ids)
  real = ids != pad_id
  length = np.where(real.any(axis=1), ids.shape[1] - np.argmax(real[:, ::-1], axis=1), 1)
  width = np.minimum(-(-length // bucket) * bucket, ids.shape[1])
  rng = np.random.default_rng(seed)
  out: list[np.ndarray] = []
  while len(out) < steps:
    batches = []
    for w in np.unique(width):
      rows = rng.permutation(np.flatnonzero(width == w))
      if rows.size < batch_size:  # too few for a batch: fill with rows of the next widths up
        rows = rng.permutation(np.flatnonzero(width >= w))[:batch_size]
      for start in range(0, rows.size - batch_size + 1, batch_size):
        batches.append(rows[start : start + batch_size])
    out.extend(batches[i] for i in rng.permutation(len(batches)))
  return [b.astype(np.int32) for b in out[:steps]]


def cut_to_longest(batch: np.ndarray, pad_id: int, bucket: int = TOKEN_BUCKET) -> np.ndarray:
  """A `(B, T)` token batch cut after its longest row, rounded up to `bucket` tokens."""
  real = np.flatnonzero((batch != pad_id).any(axis=0))
  last = int(real[-1]) + 1 if real.size else 1
  return batch[:, : min(-(-last // bucket) * bucket, batch.shape[1])]


class TeacherCache:
  """The teacher's outputs for each row of the transfer set, filled as rows are first seen.

  Build it with `TeacherCache.plan`; `lookup` gives a batch's outputs once every row of it was
  `store`d, else None (the step then runs the teacher and stores what it computed).
  """

  def __init__(self, x_all: np.ndarray, shapes: dict[str, Any], per_token: set[str], pad_id):
    n = x_all.shape[0]
    self.pad_id = pad_id
    self.seen = np.zeros(n, bool)
    self.dtypes = {name: np.dtype(s.dtype) for name, s in shapes.items()}
    self.per_token = per_token
    if per_token:
      counts = (x_all != pad_id).sum(axis=1)
      self.counts = counts
      self.offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
      total = int(counts.sum())
    self.store_arrays = {
      name: np.zeros(
        (total, *s.shape[2:]) if name in per_token else (n, *s.shape[1:]),
        TOKEN_DTYPE if name in per_token else self.dtypes[name],
      )
      for name, s in shapes.items()
    }

  @classmethod
  def plan(
    cls,
    teacher: Callable[[np.ndarray], Any],
    x_all: np.ndarray,
    *,
    reads: int,
    pad_id: int | None,
    augmented: bool,
    limit: int = CACHE_BYTES,
  ) -> tuple[TeacherCache | None, str]:
    """`(cache, why)`: a cache for `teacher`'s outputs on `x_all`, or None and the reason.

    Args:
      teacher: `x -> {name: output}` (only traced, through `jax.eval_shape`).
      x_all: the `(N, ...)` transfer inputs.
      reads: how many examples the run reads in all (steps times batch size).
      pad_id: the padding id of `(N, T)` token ids, or None.
      augmented: whether every batch is augmented before the teacher sees it.
      limit: the most bytes the cache may hold.
    """
    n = x_all.shape[0]
    if augmented:
      return None, "off: every batch is augmented, so the teacher never sees an input twice"
    if reads <= n:
      return None, "off: the run reads each example once at most"
    tokens = pad_id is not None and x_all.ndim == 2 and np.issubdtype(x_all.dtype, np.integer)
    width = x_all.shape[1] if tokens else None
    rows = min(n, 2)
    shapes = jax.eval_shape(teacher, x_all[:rows])
    narrow = shapes
    if tokens and width > TOKEN_BUCKET:  # a token axis shrinks with the batch's width
      narrow = jax.eval_shape(teacher, x_all[:rows, :TOKEN_BUCKET])
    per_token = set()
    token_shape = ((rows, width), (rows, min(width, TOKEN_BUCKET))) if tokens else None
    for name, s in shapes.items():
      if tokens and (s.shape[:2], narrow[name].shape[:2]) == token_shape:
        per_token.add(name)
      elif not (s.ndim >= 1 and s.shape[0] == rows and narrow[name].shape == s.shape):
        shape = tuple(s.shape)
        return None, f"off: the teacher's `{name}` {shape} is neither per example nor per token"
    if "logits" in per_token:
      return None, "off: the teacher's logits are per token, and their loss counts padding"
    real = int((x_all != pad_id).sum()) if per_token else 0
    size = sum(
      (real * math.prod(s.shape[2:]) * TOKEN_DTYPE.itemsize)
      if name in per_token
      else n * math.prod(s.shape[1:]) * np.dtype(s.dtype).itemsize
      for name, s in shapes.items()
    )
    if size > limit:
      return None, f"off: it would take {size / 2**30:.1f} GiB (over {limit / 2**30:.1f} GiB)"
    cache = cls(x_all, shapes, per_token, pad_id)
    return cache, f"on ({size / 2**20:.0f} MiB)"

  def _positions(self, index: np.ndarray) -> np.ndarray:
    counts = self.counts[index]
    starts = np.repeat(self.offsets[index] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return starts + np.arange(int(counts.sum()))

  def lookup(self, index: np.ndarray, batch: np.ndarray) -> dict[str, np.ndarray] | None:
    """The teacher's outputs for `batch` (rows `index` of the transfer set), or None."""
    if not self.seen[index].all():
      return None
    out = {}
    if self.per_token:
      real, positions = batch != self.pad_id, self._positions(index)
    for name, stored in self.store_arrays.items():
      if name in self.per_token:
        full = np.zeros((*batch.shape, *stored.shape[1:]), self.dtypes[name])
        full[real] = stored[positions]
        out[name] = full
      else:
        out[name] = stored[index]
    return out

  def store(self, index: np.ndarray, batch: np.ndarray, outputs: dict[str, Any]) -> None:
    """Keeps the teacher's `outputs` for `batch` (rows `index` of the transfer set)."""
    if self.per_token:
      real, positions = batch != self.pad_id, self._positions(index)
    for name, stored in self.store_arrays.items():
      value = np.asarray(outputs[name])
      if name in self.per_token:
        stored[positions] = value[real].astype(stored.dtype)
      else:
        stored[index] = value
    self.seen[index] = True
