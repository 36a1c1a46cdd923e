"""GPTQ against a plain NumPy reference: act-order, groups, several lazy-update blocks.

The reference follows Frantar et al. 2022 (arXiv:2210.17323), Algorithm 1, in float64, one row
(the paper's column: an input channel) at a time, with the conventions `jaxshrink.quant.gptq`
documents:

- `H = 2/n XᵀX`; inputs never active ("dead", zero diagonal) get a unit diagonal and no
  coupling; damping adds `damp · mean(diag H)` (of the pinned `H`) to the diagonal; the row
  updates use the upper Cholesky factor `U` of `H⁻¹` (`UᵀU = H⁻¹`).
- act-order visits rows by decreasing (undamped) Hessian diagonal, stable on ties.
- Lazy batch: within a block of `B` rows each row's error is pushed onto the later rows of the
  block at once, onto all later rows only when the block ends (`B < K` here, so several blocks
  run, the last one shorter).
- Groups without act-order are dynamic: a group's scales come from its rows once the group is
  reached, every earlier error folded in (blocks hold whole groups, so that includes the
  earlier rows of the same block). With act-order the groups are static (AutoGPTQ's
  `static_groups`): scales from the original weights, and a row keeps the group of its
  original position, so groups stay contiguous runs of `K` and need no per-row group index.
- Scales cover each group's range (`max|w| / qmax`; asymmetric `(hi - lo) / (qmax - qmin)`
  over a range that holds 0, zero point `round(qmin - lo / scale)`), rounded *up* to bfloat16
  for grouped codes of 4 bits or fewer; codes are `clip(round(w / scale + zp))`, ties to even.

Codes and zero points are compared exactly. That is well-posed only away from rounding ties,
so each case first runs the same reference in float32 to measure how far our precision moves
every rounded value, and asserts that no rounding of the float64 reference (codes, zero
points, bfloat16 scale round-ups) sits closer to a tie than twice that (`_assert_well_posed`).
"""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxshrink.quant import QArray, QuantSpec
from jaxshrink.quant.gptq import gptq
from jaxshrink.tree import Rule

K, N, ROWS, BLOCK = 40, 12, 256, 16


def _round_up_bf16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Smallest bfloat16 >= x, and x's relative distance to a change of that choice."""
  x = np.asarray(x, np.float64)
  b = x.astype(ml_dtypes.bfloat16)
  bits = b.view(np.uint16).astype(np.int64)
  bits = np.where(b.astype(np.float64) < x, bits + 1, bits)
  up = bits.astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)
  below = (bits - 1).astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)
  return up, np.minimum(up - x, x - below) / x


def _tie_distance(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
  """Distance of each value to a rounding tie, in code units (inf where it is clipped)."""
  inside = (v > lo - 0.5) & (v < hi + 0.5)
  return np.where(inside, np.abs(v - np.floor(v) - 0.5), np.inf)


class Reference:
  """GPTQ with plain loops, computing in the dtype of its inputs; records what it rounds."""

  def __init__(self, spec: QuantSpec):
    self.spec = spec
    self.rounded: list[np.ndarray] = []  # values rounded to codes or zero points, in order
    self.raw_scales: list[np.ndarray] = []  # scales before the bfloat16 round-up, in order

  def qparams(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(N,)` scales and zero points (zeros when symmetric) covering `w (rows, N)`."""
    s = self.spec
    if s.symmetric:
      raw, lo = np.abs(w).max(axis=0) / s.qmax, None
    else:
      lo = np.minimum(w.min(axis=0), 0.0)
      raw = (np.maximum(w.max(axis=0), 0.0) - lo) / (s.qmax - s.qmin)
    scale = np.maximum(raw, np.finfo(np.float32).tiny)
    if s.scale_dtype == "bfloat16":
      self.raw_scales.append(scale)
      scale = _round_up_bf16(scale)[0].astype(w.dtype)
    if lo is None:
      return scale, np.zeros_like(scale)
    v = s.qmin - lo / scale
    self.rounded.append(v)
    return scale, np.clip(np.round(v), s.qmin, s.qmax)

  def quantize_row(self, row, scale, zp) -> tuple[np.ndarray, np.ndarray]:
    v = row / scale + zp
    self.rounded.append(v)
    codes = np.clip(np.round(v), self.spec.qmin, self.spec.qmax)
    return codes, (codes - zp) * scale

  def run(self, w, h, *, damp, act_order, block):
    """Codes `(K, N)`, scales and zero points `(G, N)` of `w (K, N)` with Hessian `h (K, K)`."""
    k, n = w.shape
    group = self.spec.group_size
    groups = 1 if group is None else -(-k // group)
    diag = np.diag(h).copy()
    dead = diag == 0
    h = np.where(dead[:, None] | dead[None, :], 0.0, h) + np.diag(dead.astype(h.dtype))
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(k)
    hp = h[np.ix_(perm, perm)]
    hp = hp + h.dtype.type(damp) * np.mean(np.diag(hp)) * np.eye(k, dtype=h.dtype)
    u = np.linalg.cholesky(np.linalg.inv(hp)).T  # upper, UᵀU = H⁻¹
    scales, zps = np.zeros((groups, n), w.dtype), np.zeros((groups, n), w.dtype)
    dynamic = group is not None and not act_order
    if not dynamic:  # per-channel, or act-order's static groups: from the original weights
      for g in range(groups):
        rows = w if group is None else w[g * group : (g + 1) * group]
        scales[g], zps[g] = self.qparams(rows)
    work = w[perm].copy()
    codes = np.zeros((k, n), np.int64)
    for i1 in range(0, k, block):
      i2 = min(i1 + block, k)
      err = np.zeros((i2 - i1, n), w.dtype)
      for j in range(i1, i2):
        if dynamic and j % group == 0:
          scales[j // group], zps[j // group] = self.qparams(work[j : j + group])
        g = 0 if group is None else perm[j] // group
        c, q = self.quantize_row(work[j], scales[g], zps[g])
        codes[perm[j]] = c
        err[j - i1] = (work[j] - q) / u[j, j]
        work[j:i2] -= np.outer(u[j, j:i2], err[j - i1])  # inside the block: now
      work[i2:] -= u[i1:i2, i2:].T @ err  # the rest: once per block
    return codes, scales, zps


def _assert_well_posed(spec: QuantSpec, w, h, **kw) -> None:
  """No rounding of the float64 reference sits closer to a tie than float32 arithmetic moves it.

  Running the same reference in float32 measures how far our precision moves each rounded
  value (code units) and each pre-round-up scale (relative); exact equality of codes with a
  float32 implementation is well-posed when every tie is further away than twice that.
  """
  exact, single = Reference(spec), Reference(spec)
  exact.run(w.astype(np.float64), h.astype(np.float64), **kw)
  single.run(w.astype(np.float32), h.astype(np.float32), **kw)

  def joined(values):
    return np.concatenate([np.ravel(v) for v in values]).astype(np.float64)

  v64, v32 = joined(exact.rounded), joined(single.rounded)
  assert _tie_distance(v64, spec.qmin, spec.qmax).min() > 2 * np.abs(v32 - v64).max()
  if exact.raw_scales:
    s64, s32 = joined(exact.raw_scales), joined(single.raw_scales)
    assert _round_up_bf16(s64)[1].min() > 2 * (np.abs(s32 - s64) / s64).max()


def _layer(seed: int, dead: tuple[int, ...] = ()):
  """float32 `(ROWS, K)` correlated activations of uneven scales and `(K, N)` weights."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(K, K)) * 0.3 + np.eye(K)
  x = rng.normal(size=(ROWS, K)) @ mix * rng.uniform(0.2, 3.0, size=K)
  x[:, list(dead)] = 0.0
  x = x.astype(np.float32)
  w = rng.normal(size=(K, N)).astype(np.float32)
  return x, w


def _apply(params, x):
  return x @ params["d"]["kernel"]


CASES = [
  # (spec, act_order, damp, dead inputs, seed)
  (QuantSpec(bits=4, group_size=8), True, 0.01, (), 1),  # static groups, bf16 scales
  (QuantSpec(bits=4, symmetric=False, group_size=8), False, 0.01, (), 2),  # dynamic, mid-block
  (QuantSpec(bits=3), True, 0.01, (5, 17), 3),  # per-channel, dead inputs last
  (QuantSpec(bits=8, symmetric=False, group_size=16), True, 0.01, (), 4),  # float32 scales
  (QuantSpec(bits=2, symmetric=False), False, 0.1, (), 5),
  (QuantSpec(bits=4, group_size=16), False, 0.01, (9,), 6),  # partial last group (40 = 2x16 + 8)
]


@pytest.mark.parametrize(
  ("spec", "act_order", "damp", "dead", "seed"),
  CASES,
  ids=[f"{c[0].describe()}-act_order={c[1]}-damp={c[2]}-dead={len(c[3])}" for c in CASES],
)
def test_gptq_matches_the_numpy_reference(spec, act_order, damp, dead, seed):
  x, w = _layer(seed, dead)
  params = {"d": {"kernel": jnp.asarray(w)}}
  batches = [x[: ROWS // 2], x[ROWS // 2 :]]
  tree = gptq(_apply, params, batches, Rule("d/kernel"), spec, damp=damp, act_order=act_order,
              block_size=BLOCK)  # fmt: skip
  q = tree["d"]["kernel"]
  assert isinstance(q, QArray) and q.group_size == spec.group_size
  x64 = x.astype(np.float64)
  h = 2.0 / ROWS * x64.T @ x64
  kw = {"damp": damp, "act_order": act_order, "block": BLOCK}
  _assert_well_posed(spec, w, h, **kw)
  codes, scales, zps = Reference(spec).run(w.astype(np.float64), h, **kw)
  np.testing.assert_array_equal(np.asarray(q.unpacked_codes()), codes)
  np.testing.assert_allclose(np.asarray(q.scale, np.float64), scales, rtol=1e-5)
  if spec.symmetric:
    assert q.zero_point is None
  else:
    np.testing.assert_array_equal(np.asarray(q.zero_point), zps)
  for d in dead:  # a dead input never meets another row's error: its codes are RTN's
    g = 0 if spec.group_size is None else d // spec.group_size
    rtn = np.clip(np.round(w[d] / scales[g] + zps[g]), spec.qmin, spec.qmax)
    np.testing.assert_array_equal(codes[d], rtn)


def test_act_order_and_blocks_really_run():
  # The cases above would not test much if act-order kept the identity order or one block
  # held all rows; pin both for the first case.
  x, _ = _layer(1)
  order = np.argsort(-np.diag(x.T.astype(np.float64) @ x), kind="stable")
  assert not np.array_equal(order, np.arange(K))
  assert K > BLOCK and K % BLOCK != 0  # three blocks, the last one shorter
