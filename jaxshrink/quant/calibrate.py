"""Activation calibration: static per-tensor scales from calibration batches.

Statistics of the inputs that meet each kernel come from `capture.collect`, which replays the
user's apply function (linen, nnx or pure), so no module needs instrumenting. Methods:

- `absmax`: the largest |x| seen (activation codes are symmetric, so a separate min and max
  would give the same range: the former alias `minmax` is refused with a usage error);
- `percentile`: the `percentile`-th percentile of |x| over a row sample (clips outliers);
- `mse`: the clipping value on a grid that minimizes the quantization MSE on the sample.

>>> scales = calibrate(model.apply, params, batches, ".*kernel", method="mse")
>>> scales["dense1/kernel"].clip      # float, the clipping value; scale = clip / 127
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxshrink.capture import Reducer, Site, absmax_reducer, collect, layer_stats
from jaxshrink.errors import InvalidValueError, UsageError
from jaxshrink.tree import Rule

METHODS = ("absmax", "percentile", "mse")
# Former names and their replacements. `minmax` computed exactly what `absmax` does (the
# activation codes are symmetric: one scale, no zero point), so it is refused by name.
REMOVED_METHODS = {"minmax": "absmax"}
# Rows kept per kernel for percentile / MSE calibration.
SAMPLE_ROWS = 2048


def sample_reducer(rows: int = SAMPLE_ROWS) -> Reducer:
  """Keeps the first `rows` counted rows of the `(rows, K)` input matrix (and how many were
  kept); padding rows (weight 0) are skipped."""

  def init(k):
    return jnp.zeros((rows, k), jnp.float32), jnp.zeros((), jnp.int32)

  def update(state, x, w):
    buf, count = state
    m = min(x.shape[0], rows)
    # Counted rows first, in order; the padding rows written after them lie past `count`,
    # where the next batch (or the final `buf[:count]`) overwrites or drops them.
    x = x[jnp.argsort(w <= 0, stable=True)]
    # Write into a buffer with `m` rows of slack, so a full buffer simply stops growing.
    slack = jnp.concatenate([buf, jnp.zeros((m, buf.shape[1]), buf.dtype)])
    slack = lax.dynamic_update_slice(
      slack, x[:m].astype(jnp.float32), (jnp.minimum(count, rows), 0)
    )
    return slack[:rows], count + jnp.minimum(jnp.sum(w > 0), m).astype(jnp.int32)

  return Reducer(init=init, update=update)


@dataclasses.dataclass(frozen=True)
class ActivationStats:
  """Calibrated statistics of one kernel's input.

  Attributes:
    absmax: `(K,)` float32 max |x| per input element (SmoothQuant / AWQ use it); `(L, K)`
      for a stacked kernel (`site.layers` set), one row per layer.
    clip: the per-tensor clipping value chosen by the method (scale = clip / qmax); a `(L,)`
      float32 array for a stacked kernel.
    site: how the kernel is consumed.
  """

  absmax: np.ndarray
  clip: float | np.ndarray
  site: Site


def _fq_error(x: np.ndarray, clip: float, bits: int) -> float:
  qmax = 2 ** (bits - 1) - 1
  s = max(clip, 1e-30) / qmax
  return float(np.mean((x - np.clip(np.round(x / s), -qmax, qmax) * s) ** 2))


def check_method(method: str, argument: str = "method") -> None:
  """Raises unless `method` is one of `METHODS`, naming `argument` (e.g. `calibration`).

  Raises:
    UsageError: a removed method (names its replacement). ValueError: an unknown one.
  """
  if method in REMOVED_METHODS:
    raise UsageError(
      f"Calibration `{argument}` {method!r} was removed: activation codes are symmetric, so it "
      f"gave exactly the range of {REMOVED_METHODS[method]!r}. Set `{argument}` to "
      f"{REMOVED_METHODS[method]!r} (or 'percentile' / 'mse' to clip outliers)."
    )
  if method not in METHODS:
    raise InvalidValueError(
      f"Calibration `{argument}` must be one of {list(METHODS)}; got {method!r}."
    )


def choose_clip(sample: np.ndarray, absmax: float, method: str, *, bits: int = 8,
                percentile: float = 99.99) -> float:  # fmt: skip
  """Clipping value of one tensor's activations for `method`."""
  check_method(method)
  if method == "absmax" or sample.size == 0:
    return float(absmax)
  if method == "percentile":
    return float(min(np.percentile(np.abs(sample), percentile), absmax))
  grid = np.linspace(0.2, 1.0, 41) * absmax
  errors = [_fq_error(sample, c, bits) for c in grid]
  return float(grid[int(np.argmin(errors))])


def calibrate(
  apply_fn: Callable[[Any, Any], Any],
  params: Any,
  batches: Iterable[Any],
  rule: Rule | str,
  *,
  method: str = "absmax",
  bits: int = 8,
  percentile: float = 99.99,
  input_scales: Mapping[str, np.ndarray] | None = None,
) -> dict[str, ActivationStats]:
  """Per-kernel activation statistics and clipping values.

  Args:
    apply_fn, params, batches, rule: as `capture.collect`.
    method: `absmax`, `percentile` or `mse`.
    bits: activation bits (MSE search only).
    percentile: for `percentile`.
    input_scales: optional `{path: (K,)}` (`(L, K)` for a stacked kernel); the clip is
      computed for `x / input_scale` (SmoothQuant's migrated activations).

  Raises:
    ValueError: unknown method. UsageError: `minmax` (removed; use `absmax`).
    JaxshrinkError: empty or non-finite calibration data.
  """
  check_method(method)
  reducers = {"absmax": absmax_reducer()}
  if method in ("percentile", "mse"):
    reducers["sample"] = sample_reducer()
  found = collect(apply_fn, params, batches, rule, reducers)
  out = {}
  for path, stats in found.stats.items():
    site = found.sites[path]
    scales = None if input_scales is None else input_scales.get(path)
    absmaxes, clips = [], []
    for i, layer in enumerate(layer_stats(stats, site)):
      absmax = np.asarray(layer["absmax"], np.float32)
      s = None if scales is None else np.asarray(scales if site.layers is None else scales[i])
      if s is not None:
        absmax = absmax / s.astype(np.float32)
      sample = np.zeros((0,), np.float32)
      if "sample" in layer:
        buf, count = layer["sample"]
        sample = np.asarray(buf)[: int(min(int(count), buf.shape[0]))]
        if s is not None:
          sample = sample / s.astype(np.float32)[None, :]
      absmaxes.append(absmax)
      clips.append(
        choose_clip(sample, float(absmax.max()), method, bits=bits, percentile=percentile)
      )
    if site.layers is None:
      out[path] = ActivationStats(absmax=absmaxes[0], clip=clips[0], site=site)
    else:
      out[path] = ActivationStats(np.stack(absmaxes), np.asarray(clips, np.float32), site)
  return out


def check_batches(batches: Any) -> list:
  """A list of calibration batches; raises on an empty set (naming the fix)."""
  from jaxshrink.errors import JaxshrinkError

  batches = list(batches) if batches is not None else []
  if not batches:
    raise JaxshrinkError(
      "The calibration set is empty; pass at least one batch (e.g. `calibration_batches: 8`)."
    )
  return batches
