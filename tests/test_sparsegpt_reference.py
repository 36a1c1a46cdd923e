"""SparseGPT against a plain NumPy reference, over several blocks of columns.

The reference follows Frantar & Alistarh 2023 (arXiv:2301.00774), Algorithm 1, in float64, in
the paper's orientation (`W` is `(outputs, inputs)`, columns = input channels), with the
conventions `jaxshrink.sparsity.oneshot.sparsegpt` documents:

- `H = 2/n XᵀX`; a dead input (zero diagonal) gets a unit diagonal, no coupling and a zero
  weight column (so it is pruned first, at no cost); damping adds `damp · mean(diag H)`; the
  updates use the upper Cholesky factor `U` of `H⁻¹` (`UᵀU = H⁻¹`).
- The mask block equals the lazy-update block (`Bs = B`, as in the authors' code). Unstructured:
  at the start of each block of `B` columns, the `round(p · rows · B)` weights of the block
  with the lowest `w² / U_cc²` are pruned (ties: lower row-major position first). N:M: at every
  `M`-th column, the `M - N` lowest of each row's next `M` weights, from the weights as they
  are then (earlier errors of the block folded in).
- Column `c`'s error `(w_c - q_c) / U_cc` goes onto the later columns of the block at once, and
  onto all later columns when the block ends. `B < K` here, so several blocks run, the last
  one shorter.

Masks are compared exactly, which is well-posed only away from ties in the rankings: each case
also runs the reference in float32, measures how far our precision moves the scores, and
asserts no ranking decision of the float64 reference is closer than twice that.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxshrink.sparsity import Pruner
from jaxshrink.sparsity.oneshot import _sparsegpt_with_masks

K, N, ROWS = 40, 12, 256


class Reference:
  """SparseGPT with plain loops in the dtype of its inputs; records every ranking it makes."""

  def __init__(self, sparsity: float, nm: tuple[int, int] | None):
    self.sparsity, self.nm = sparsity, nm
    self.scores: list[np.ndarray] = []  # every score ranked, in order
    self.gaps: list[float] = []  # relative gap between the last pruned and first kept score

  def _rank(self, score: np.ndarray, drop: int) -> np.ndarray:
    """Indices of the `drop` lowest scores (stable), recording the gap at the cut."""
    self.scores.append(score)
    order = np.argsort(score, kind="stable")
    ranked = score[order]
    if 0 < drop < score.size:
      self.gaps.append((ranked[drop] - ranked[drop - 1]) / max(ranked[drop], 1e-30))
    return order[:drop]

  def run(self, w, h, *, damp, block):
    """Pruned `w (rows, K)` and its bool keep mask, for Hessian `h (K, K)`."""
    rows, k = w.shape
    dead = np.diag(h) == 0
    h = np.where(dead[:, None] | dead[None, :], 0.0, h) + np.diag(dead.astype(h.dtype))
    h = h + h.dtype.type(damp) * np.mean(np.diag(h)) * np.eye(k, dtype=h.dtype)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, UᵀU = H⁻¹
    w = np.where(dead[None, :], 0.0, w).astype(h.dtype)
    keep = np.ones((rows, k), bool)
    for i1 in range(0, k, block):
      i2 = min(i1 + block, k)
      w1 = w[:, i1:i2].copy()
      diag = np.diag(u)[i1:i2]
      pruned = np.zeros(w1.shape, bool)
      if self.nm is None:
        drop = round(self.sparsity * w1.size)
        pruned.ravel()[self._rank(((w1 / diag) ** 2).ravel(), drop)] = True
      err = np.zeros_like(w1)
      for j in range(i2 - i1):
        if self.nm is not None and j % self.nm[1] == 0:
          n, m = self.nm
          for r in range(rows):  # each row's next M weights, as they are now
            score = (w1[r, j : j + m] / diag[j : j + m]) ** 2
            # The N highest stay; ties go to the lower position (a stable descending sort).
            order = np.argsort(-score, kind="stable")
            self._record_nm(score, order, n)
            pruned[r, j + order[n:]] = True
        col = w1[:, j].copy()
        q = np.where(pruned[:, j], 0.0, col)
        err[:, j] = (col - q) / u[i1 + j, i1 + j]
        w1[:, j:] -= np.outer(err[:, j], u[i1 + j, i1 + j : i2])  # inside the block: now
        w1[:, j] = q
      w[:, i1:i2] = w1
      w[:, i2:] -= err @ u[i1:i2, i2:]  # the rest: once per block
      keep[:, i1:i2] = ~pruned
    return w, keep

  def _record_nm(self, score: np.ndarray, order: np.ndarray, n: int) -> None:
    self.scores.append(score)
    kept, cut = score[order[n - 1]], score[order[n]]
    self.gaps.append((kept - cut) / max(kept, 1e-30))


def _assert_well_posed(sparsity, nm, w, h, **kw) -> None:
  """No ranking of the float64 reference is closer than float32 arithmetic moves its scores."""
  exact, single = Reference(sparsity, nm), Reference(sparsity, nm)
  exact.run(w.astype(np.float64), h.astype(np.float64), **kw)
  single.run(w.astype(np.float32), h.astype(np.float32), **kw)
  s64 = np.concatenate([np.ravel(s) for s in exact.scores]).astype(np.float64)
  s32 = np.concatenate([np.ravel(s) for s in single.scores]).astype(np.float64)
  moved = np.max(np.abs(s32 - s64) / np.maximum(s64, 1e-30))
  assert min(exact.gaps) > 2 * moved, (min(exact.gaps), moved)


def _layer(seed: int, dead: tuple[int, ...]):
  """float32 `(ROWS, K)` correlated activations with a few loud channels, `(K, N)` weights."""
  rng = np.random.default_rng(seed)
  gain = rng.uniform(0.3, 2.0, size=K)
  gain[[2, 11, 30]] = 6.0
  x = (rng.normal(size=(ROWS, K)) @ (np.eye(K) + 0.3 * rng.normal(size=(K, K)))) * gain
  x[:, list(dead)] = 0.0
  return x.astype(np.float32), rng.normal(size=(K, N)).astype(np.float32)


def _apply(params, x):
  return x @ params["d"]["kernel"]


CASES = [
  # (sparsity, structure, N:M, block, damp, dead inputs, seed)
  (0.5, "unstructured", None, 16, 0.01, (), 0),
  (0.7, "unstructured", None, 12, 0.01, (7,), 1),
  (0.5, "2:4", (2, 4), 16, 0.01, (), 2),
  (0.5, "2:4", (2, 4), 12, 0.1, (21,), 3),
]


@pytest.mark.parametrize(
  ("sparsity", "structure", "nm", "block", "damp", "dead", "seed"),
  CASES,
  ids=[f"{c[1]}-{c[0]}-block{c[3]}-damp{c[4]}-dead{len(c[5])}" for c in CASES],
)
def test_sparsegpt_matches_the_numpy_reference(sparsity, structure, nm, block, damp, dead, seed):
  assert K > block and K % block != 0  # several blocks, the last one shorter
  x, w = _layer(seed, dead)
  params = {"d": {"kernel": jnp.asarray(w)}}
  pruner = Pruner("d/kernel", sparsity, structure=structure)
  batches = [x[: ROWS // 2], x[ROWS // 2 :]]
  # The masks the sweep applied (a dead input's kept weight would read as pruned off the zeros).
  pruned, masks = _sparsegpt_with_masks(
    _apply, params, batches, pruner, block_size=block, damp=damp
  )
  x64 = x.astype(np.float64)
  h = 2.0 / ROWS * x64.T @ x64
  _assert_well_posed(sparsity, nm, w.T, h, damp=damp, block=block)
  want, keep = Reference(sparsity, nm).run(w.T.astype(np.float64), h, damp=damp, block=block)
  got_keep = np.asarray(masks["d"]["kernel"])
  assert got_keep.dtype == bool
  np.testing.assert_array_equal(got_keep, keep.T)
  np.testing.assert_allclose(np.asarray(pruned["d"]["kernel"]), want.T, rtol=1e-4, atol=1e-5)
  assert keep.mean() == pytest.approx(1 - sparsity, abs=1 / (N * block))
  for d in dead:  # a dead input's weights carry nothing: pruned first
    assert not keep[:, d].any()
  if nm is not None:
    assert (keep.reshape(N, K // 4, 4).sum(axis=-1) == 2).all()
