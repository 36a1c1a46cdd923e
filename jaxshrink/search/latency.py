"""Per-kernel run time of each candidate, for `objective: latency`.

Each kernel's matmul is timed alone, stored as each candidate (the leaves the uniform runs
produced), in one serving mode (`jaxshrink.serving.serve`) on this backend, on an input of
the rows one timed batch feeds it: the batch's rows times its sequence length for token
models, its rows otherwise. The candidates of one kernel are timed interleaved, best of a few
rounds, so load changes hit them alike. A kernel's time is what the solver minimizes; the
verified model's time against float is measured whole (`serving.measure`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.bench import calls_per_round, interleaved_best
from jaxshrink.encoding import logical_shape
from jaxshrink.errors import UsageError

ROUNDS = 3
ROUND_SECONDS = 0.02


def _matmul(params: Any, x: jax.Array) -> jax.Array:
  return x @ params["w"]


def kernel_seconds(
  leaves: dict[str, dict[str, Any]], rows: int, mode: str, dtype: Any = jnp.float32
) -> dict[str, dict[str, float]]:
  """`{path: {candidate: seconds}}` for `leaves = {path: {candidate: leaf}}`.

  Raises:
    UsageError: a kernel that is not a 2-D matrix (a conv or a scan-stacked kernel), whose
      time alone would not be the time it takes in the model.
  """
  from jaxshrink.serving import serve

  out: dict[str, dict[str, float]] = {}
  for path, by_name in leaves.items():
    shape = tuple(logical_shape(next(iter(by_name.values()))))
    if len(shape) != 2:
      raise UsageError(
        f"`objective: latency` of `search` times each kernel's matmul alone, and `{path}` has "
        f"shape {shape} (a conv or stacked kernel). Use `objective: bytes`, or exclude it from "
        "`target`."
      )
    x = jnp.asarray(np.random.default_rng(0).standard_normal((rows, shape[0])), dtype)
    runs = {name: serve(_matmul, {"w": leaf}, mode) for name, leaf in by_name.items()}
    for run in runs.values():
      jax.block_until_ready(run(x))
    calls = calls_per_round(functools.partial(next(iter(runs.values())), x), ROUND_SECONDS)
    best = interleaved_best({n: functools.partial(r, x) for n, r in runs.items()}, ROUNDS, calls)
    out[path] = {name: float(f"{seconds:.6g}") for name, seconds in best.items()}
  return out


def batch_rows(x: np.ndarray) -> int:
  """Rows a kernel sees for the batch `x`: tokens for integer token ids, else samples."""
  x = np.asarray(x)
  return int(np.prod(x.shape)) if np.issubdtype(x.dtype, np.integer) else int(x.shape[0])
