"""Choosing one candidate per kernel: the Lagrangian frontier of cost against error.

Minimizing `sum(error) + lam * sum(cost)` separates per kernel, and as `lam` grows each
kernel steps down the lower convex hull of its own (cost, error) points. Sorting every hull
step of every kernel by its price (error added per unit of cost saved) and taking them in that
order walks the whole frontier, from the least-error assignment to the cheapest, one kernel
step at a time: each prefix is the best assignment the proxy knows at its cost. Points off
the hulls are never chosen (the multiple-choice knapsack's LP relaxation; the verification
that follows measures what the proxy only predicts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class Point:
  """One assignment on the frontier: `{kernel: candidate name}`, its summed cost and error."""

  choice: dict[str, str]
  cost: float
  error: float


def _hull(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
  """The lower-left convex hull of (cost, error, name), from the least error to the least cost."""
  points = sorted(points, key=lambda p: (p[1], p[0]))  # by error, then cost
  pareto = []
  for p in points:  # keep only points cheaper than every point with less error
    if not pareto or p[0] < pareto[-1][0]:
      pareto.append(p)
  hull: list[tuple[float, float, str]] = []
  for p in pareto:
    while len(hull) >= 2:
      (c0, e0, _), (c1, e1, _) = hull[-2], hull[-1]
      # hull[-1] is dropped when it lies above the segment hull[-2] -> p.
      if (e1 - e0) * (c0 - p[0]) >= (p[1] - e0) * (c0 - c1):
        hull.pop()
      else:
        break
    hull.append(p)
  return hull


def frontier(
  errors: Mapping[str, Mapping[str, float]], costs: Mapping[str, Mapping[str, float]]
) -> list[Point]:
  """Every assignment on the frontier, from the least total error to the least total cost."""
  hulls = {
    path: _hull([(float(costs[path][n]), float(e), n) for n, e in by_name.items()])
    for path, by_name in errors.items()
  }
  choice = {path: hull[0][2] for path, hull in hulls.items()}
  cost = sum(hull[0][0] for hull in hulls.values())
  error = sum(hull[0][1] for hull in hulls.values())
  steps = []
  for path, hull in hulls.items():
    for (c0, e0, _), (c1, e1, name) in zip(hull, hull[1:], strict=False):
      steps.append(((e1 - e0) / (c0 - c1), path, c1 - c0, e1 - e0, name))
  steps.sort(key=lambda s: (s[0], s[1]))
  points = [Point(dict(choice), cost, error)]
  for _, path, d_cost, d_error, name in steps:
    choice[path] = name
    cost, error = cost + d_cost, error + d_error
    points.append(Point(dict(choice), cost, error))
  return points


def thin(points: list[Point], count: int) -> list[Point]:
  """At most `count` points spread evenly in cost, always keeping both ends."""
  if len(points) <= count:
    return points
  lo, hi = points[-1].cost, points[0].cost
  kept, next_cost = [], hi
  step = (hi - lo) / (count - 1)
  for p in points:
    if p.cost <= next_cost + 1e-9:
      kept.append(p)
      next_cost = p.cost - step
  if kept[-1] is not points[-1]:
    kept.append(points[-1])
  return kept


def fill(
  point: Point,
  errors: Mapping[str, Mapping[str, float]],
  costs: Mapping[str, Mapping[str, float]],
  budget: float,
) -> Point:
  """`point` with the cost left under `budget` spent: repeatedly move the one kernel whose
  move to a lower-error candidate buys the most error per unit of cost and still fits.

  The frontier moves in whole hull steps, so its last point under a budget can leave a large
  part of it unused (one table step is megabytes); this spends the rest greedily.
  """
  choice, cost, error = dict(point.choice), point.cost, point.error
  while True:
    best = None
    for path, name in choice.items():
      for other, e in errors[path].items():
        d_cost = costs[path][other] - costs[path][name]
        d_error = errors[path][name] - e
        if d_error <= 0 or cost + d_cost > budget:
          continue
        gain = d_error / max(d_cost, 1e-12)
        if best is None or gain > best[0]:
          best = (gain, path, other, d_cost, d_error)
    if best is None:
      return Point(choice, cost, error)
    _, path, other, d_cost, d_error = best
    choice[path] = other
    cost, error = cost + d_cost, error - d_error
