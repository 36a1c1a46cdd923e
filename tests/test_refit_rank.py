"""Ranking heads and channels by the error the least-squares refit leaves
(`jaxshrink.sparsity.refit_rank`; the stage option is tested in test_minitron)."""

import numpy as np
import pytest

from jaxshrink.errors import InvalidValueError
from jaxshrink.sparsity.refit_rank import elimination_scores


def _problem(k=8, n=3, rows=400, seed=0, bias=True):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(rows, k)) @ rng.normal(size=(k, k)) + 0.3  # correlated, with a mean
  kernel = rng.normal(size=(k, n))
  b = rng.normal(size=n) if bias else None
  xa = np.concatenate([x, np.ones((rows, 1))], axis=1) if bias else x
  return x, xa, kernel, b


def _refit_error(x, xa, kernel, bias, kept):
  """The squared error of the least-squares refit of the kept columns (and the bias)."""
  target = x @ kernel + (0 if bias is None else bias)
  cols = [*kept, xa.shape[1] - 1] if bias is not None else list(kept)
  fit = np.linalg.lstsq(xa[:, cols], target, rcond=None)[0]
  return float(np.sum((xa[:, cols] @ fit - target) ** 2))


@pytest.mark.parametrize("bias", [True, False])
def test_elimination_is_the_greedy_order_of_the_refit_error(bias):
  x, xa, kernel, b = _problem(bias=bias)
  scores, costs = elimination_scores(xa.T @ xa, kernel, b, group=1, damp=0.0)
  assert sorted(scores.tolist()) == list(range(8))
  # Brute force: at each step drop the column whose removal leaves the smallest refit error.
  alive, order = list(range(8)), []
  while alive:
    j = min(alive, key=lambda c: _refit_error(x, xa, kernel, b, [a for a in alive if a != c]))
    order.append(j)
    alive.remove(j)
  assert np.argsort(scores).tolist() == order
  # The costs add up to the refit error of each width.
  removed = np.cumsum(costs[order])
  for width in (6, 3, 1):
    kept = order[8 - width :]
    np.testing.assert_allclose(removed[7 - width], _refit_error(x, xa, kernel, b, kept), rtol=1e-6)


def test_groups_leave_together_and_an_idle_group_goes_first():
  x, xa, kernel, b = _problem(k=8)
  kernel[2:4] = 0.0  # group 1 (columns 2, 3) feeds nothing
  scores, _ = elimination_scores(xa.T @ xa, kernel, b, group=2, damp=0.01)
  assert scores.shape == (4,) and scores[1] == 0
  # With the refit, a column that copies a kept one costs nothing to remove; by its activation
  # size it would rank high.
  x, _, kernel, b = _problem(k=8, seed=1)
  twin = np.concatenate([x, 5 * x[:, :1]], axis=1)
  ta = np.concatenate([twin, np.ones((len(twin), 1))], axis=1)
  heavy = np.concatenate([kernel, np.ones((1, kernel.shape[1]))])
  ranked, _ = elimination_scores(ta.T @ ta, heavy, b, group=1, damp=1e-6)
  assert int(np.argmin(ranked)) in (0, 8)


def test_elimination_refuses_a_gram_of_the_wrong_shape():
  _, xa, kernel, b = _problem()
  with pytest.raises(InvalidValueError, match=r"needs a \(9, 9\) Gram .* groups of 3"):
    elimination_scores(xa.T @ xa, kernel, b, group=3, damp=0.01)
  with pytest.raises(InvalidValueError, match=r"needs a \(9, 9\) Gram"):
    elimination_scores(np.eye(8), kernel, b, group=1, damp=0.01)


def test_allocate_widths_cuts_where_the_scaled_cost_is_lowest():
  from jaxshrink.models.bert import BertConfig
  from jaxshrink.sparsity.minitron import Importance, PruningPlan
  from jaxshrink.sparsity.minitron_widths import allocate_widths

  config = BertConfig(num_layers=2, hidden_size=16, num_heads=2, intermediate_size=64)
  rng = np.random.default_rng(0)
  ranked = tuple(rng.permutation(64).astype(np.float32) for _ in range(2))
  costs = tuple(
    np.sort(rng.uniform(size=64)).astype(np.float32)[np.argsort(np.argsort(r))] for r in ranked
  )  # fmt: skip  (costs grow along each layer's removal order)
  scores = Importance(heads=(np.ones(2),) * 2, channels=ranked, layers=np.ones(2),
                      channel_costs=costs)  # fmt: skip
  plan = PruningPlan(layers=(0, 1), heads=((0, 1),) * 2, channels=(tuple(range(32)),) * 2)
  even = allocate_widths(scores, plan, config, np.array([1.0, 1.0]))
  assert sum(even) <= 64 and all(w % 8 == 0 for w in even)
  skewed = allocate_widths(scores, plan, config, np.array([1.0, 10.0]))
  assert skewed[1] > skewed[0] and sum(skewed) <= 64
  floor = allocate_widths(scores, plan, config, np.array([1.0, 1e6]))
  assert floor == (8, 56)  # layer 0 stops at its floor (1/8 of 64 = 8 channels)
