"""Pruning schedules: when masks are recomputed and how sparse they are at each step.

A schedule answers two questions inside `jit` for a traced step count: which
fraction of the final sparsity applies now (`fraction(step)`, float32 in
[0, 1]) and whether the masks are recomputed at this step (`is_update(step)`).

The polynomial schedule is Zhu & Gupta, "To prune, or not to prune" (2017):
`s_t = s_f * (1 - (1 - (t - begin) / (end - begin)) ** 3)`, updated every
`frequency` steps between `begin` and `end`.

>>> sched = polynomial_schedule(begin=0, end=100, frequency=10)
>>> float(sched.fraction(jnp.int32(50)))     # 1 - 0.5 ** 3
0.875
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxshrink.errors import InvalidTypeError, InvalidValueError

SCHEDULE_KINDS = ("oneshot", "constant", "periodic", "polynomial")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When masks update and how much of the final sparsity applies.

  Attributes:
    kind: `oneshot` (prune once at `begin`), `constant` (final sparsity from
      `begin`, masks re-ranked every `frequency` steps until `end`), `periodic`
      (iterative pruning: each update in [begin, end] adds an equal share of the
      final sparsity), or `polynomial` (Zhu & Gupta cubic ramp).
    begin: first step at which masks are computed.
    end: last step at which masks may change (None: `begin` for oneshot, never
      stops for constant).
    frequency: steps between mask updates.
    power: exponent of the polynomial ramp (3 in Zhu & Gupta).
  """

  kind: str = "polynomial"
  begin: int = 0
  end: int | None = None
  frequency: int = 100
  power: float = 3.0

  def __post_init__(self):
    if self.kind not in SCHEDULE_KINDS:
      raise InvalidValueError(
        f"Unknown schedule kind {self.kind!r}; expected one of {list(SCHEDULE_KINDS)}."
      )
    for name in ("begin", "frequency"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTypeError(f"schedule `{name}` must be an int; got {value!r}.")
    if self.begin < 0:
      raise InvalidValueError(f"schedule `begin` must be >= 0; got {self.begin}.")
    if self.frequency < 1:
      raise InvalidValueError(f"schedule `frequency` must be >= 1; got {self.frequency}.")
    if self.end is not None:
      if isinstance(self.end, bool) or not isinstance(self.end, int):
        raise InvalidTypeError(f"schedule `end` must be an int or None; got {self.end!r}.")
      if self.end < self.begin:
        raise InvalidValueError(
          f"schedule `end` ({self.end}) comes before `begin` ({self.begin}); set end >= begin."
        )
    if self.kind in ("polynomial", "periodic") and self.end is None:
      raise InvalidValueError(
        f"A {self.kind} schedule needs an `end` step; got None. Set e.g. end=<steps * 0.7>."
      )

  @property
  def last(self) -> int | None:
    """The last step at which masks may change, or None for never-ending updates."""
    return self.begin if self.kind == "oneshot" else self.end

  def fraction(self, step: Any) -> jax.Array:
    """Fraction of the final sparsity that applies at `step`, float32 in [0, 1]."""
    step = jnp.asarray(step, jnp.int32)
    started = step >= self.begin
    if self.kind in ("oneshot", "constant"):
      return jnp.where(started, 1.0, 0.0).astype(jnp.float32)
    span = max(self.end - self.begin, 1)
    # The ramp only moves at update steps: the value holds between them.
    at = jnp.clip(step - self.begin, 0, span)
    at = (at // self.frequency) * self.frequency
    if self.end - self.begin <= 0:
      at = jnp.int32(span)
    progress = at.astype(jnp.float32) / span
    if self.kind == "polynomial":
      value = 1.0 - (1.0 - progress) ** self.power
    else:  # periodic: equal increments, the first update already prunes one share
      updates = span // self.frequency + 1
      done = jnp.minimum(at // self.frequency + 1, updates)
      value = done.astype(jnp.float32) / updates
    value = jnp.where(step >= self.end, 1.0, value)
    return jnp.where(started, value, 0.0).astype(jnp.float32)

  def is_update(self, step: Any) -> jax.Array:
    """Whether masks are recomputed at `step` (bool scalar)."""
    step = jnp.asarray(step, jnp.int32)
    if self.kind == "oneshot":
      return step == self.begin
    on_grid = (step - self.begin) % self.frequency == 0
    ok = (step >= self.begin) & on_grid
    if self.last is not None:
      ok = ok & (step <= self.last)
      if self.kind in ("polynomial", "periodic"):
        ok = ok | (step == self.last)  # always land on the final sparsity
    return ok


def polynomial_schedule(begin: int, end: int, frequency: int = 100, power: float = 3.0) -> Schedule:
  """Zhu & Gupta cubic ramp from 0 at `begin` to the final sparsity at `end`."""
  return Schedule("polynomial", begin, end, frequency, power)


def constant_schedule(begin: int = 0, end: int | None = None, frequency: int = 100) -> Schedule:
  """Final sparsity from `begin`; masks re-ranked every `frequency` steps until `end`."""
  return Schedule("constant", begin, end, frequency)


def periodic_schedule(begin: int, end: int, frequency: int) -> Schedule:
  """Iterative pruning: every `frequency` steps adds an equal share of the sparsity."""
  return Schedule("periodic", begin, end, frequency)


def one_shot_schedule(step: int = 0) -> Schedule:
  """Prune once at `step` and keep the mask fixed afterwards."""
  return Schedule("oneshot", step, None, 1)


def schedule_from_options(options: dict[str, Any] | None, *, steps: int) -> Schedule:
  """A `Schedule` from a recipe mapping `{kind, begin, end, frequency}`.

  Missing keys default to a polynomial ramp over the first 70% of `steps`.
  """
  options = dict(options or {})
  unknown = set(options) - {"kind", "begin", "end", "frequency", "power"}
  if unknown:
    raise InvalidValueError(
      f"Unknown schedule keys {sorted(unknown)}; valid keys: kind, begin, end, frequency, power."
    )
  kind = options.get("kind", "polynomial")
  begin = options.get("begin", 0)
  end = options.get("end", max(begin, int(0.7 * steps)) if kind != "oneshot" else None)
  frequency = options.get("frequency", max(1, steps // 20))
  return Schedule(kind, begin, end, frequency, float(options.get("power", 3.0)))
