"""Least-squares refit of the projections that read pruned heads and channels.

Slicing heads or feed-forward channels out of a BERT layer removes terms from the sum its
output projection computes: `y = X W + b` loses the rows of `W` that read the removed
columns of `X`. What those columns contributed is partly predictable from the columns that
stay (activations are correlated), so the kept rows and the bias are refitted to the float
layer's output on calibration data instead of being kept as they were:

    min ||X_k W' + b' - (X W + b)||^2  ->  [W'; b'] = (G_kk + λI)^-1 G_k: [W; b]

with `G` the Gram of `[X, 1]` (collected once from the float model; `X` is the input of
`attention/output/kernel`, the heads' context vectors, and of `output/kernel`, the GELU
outputs) and `λ` a small damping relative to the mean diagonal. With nothing removed and no
damping the refit returns `W` and `b`. Every layer is fitted on the float model's own inputs
(one pass), which is what the shrunk model sees before any layer has changed; `recover`
fine-tunes the rest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.capture import Reducer, collect, padding
from jaxshrink.models.bert import BertConfig
from jaxshrink.sparsity.minitron import CHANNEL_INPUT, HEAD_INPUT, head_columns

# The damping added to the kept Gram, relative to its mean diagonal (as GPTQ's `damp`).
REFIT_DAMP = 0.01


def augmented_gram_reducer() -> Reducer:
  """`[X, 1]^T [X, 1]` over the rows that count, shape `(K + 1, K + 1)`; the last diagonal entry
  is the row count and the last row the column sums."""

  def update(state, x, w):
    xa = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
    return state + (xa * w[:, None]).T @ xa

  return Reducer(init=lambda k: jnp.zeros((k + 1, k + 1), jnp.float32), update=update)


def refit_projection(
  gram: np.ndarray, kernel: np.ndarray, bias: np.ndarray, kept: np.ndarray, damp: float
) -> tuple[np.ndarray, np.ndarray]:
  """The kept rows of `kernel` and the bias, refitted to the full layer's outputs.

  Args:
    gram: `(K + 1, K + 1)` Gram of `[X, 1]` (`augmented_gram_reducer`).
    kernel: `(K, N)` the projection; bias: `(N,)`.
    kept: sorted indices of the input columns that stay.
    damp: damping relative to the mean diagonal of the kept Gram.

  Returns:
    `(kernel (len(kept), N), bias (N,))` in the kernel's dtype.
  """
  gram = np.asarray(gram, np.float64)
  k = kernel.shape[0]
  rows = np.append(np.asarray(kept, np.int64), k)
  a = gram[np.ix_(rows, rows)]
  diagonal = np.arange(len(kept))  # the bias row is not damped
  if len(kept):
    a[diagonal, diagonal] += damp * np.mean(a[diagonal, diagonal])
  full = np.concatenate([np.asarray(kernel, np.float64), np.asarray(bias, np.float64)[None]])
  fitted = np.linalg.solve(a, gram[rows] @ full)
  return fitted[:-1].astype(kernel.dtype), fitted[-1].astype(bias.dtype)


def refit_dense(
  gram: np.ndarray, dense: dict[str, Any], kept: Any, damp: float = REFIT_DAMP
) -> tuple[np.ndarray, np.ndarray]:
  """`refit_projection` of a Dense layer's `{"kernel", "bias"}`, keeping the input rows `kept`."""
  return refit_projection(
    gram, np.asarray(dense["kernel"]), np.asarray(dense["bias"]), np.asarray(kept, np.int64), damp
  )


def refit_kernel(gram: np.ndarray, kernel: np.ndarray, kept: np.ndarray, damp: float) -> np.ndarray:
  """The kept rows of a bias-free `kernel` `(K, N)` refitted to the full projection's outputs:
  `(G_kk + λI)^-1 G_k: W` with `gram` the `(K, K)` Gram of its input `X`."""
  gram = np.asarray(gram, np.float64)
  kept = np.asarray(kept, np.int64)
  a = gram[np.ix_(kept, kept)]
  if len(kept):
    a[np.diag_indices_from(a)] += damp * np.mean(np.diag(a))
  fitted = np.linalg.solve(a, gram[kept] @ np.asarray(kernel, np.float64))
  return fitted.astype(kernel.dtype)


def input_grams(
  apply_fn: Any, params: Any, paths: Sequence[str], batches: Sequence[np.ndarray], *, bias=True
) -> dict[str, np.ndarray]:
  """The Grams of the inputs of the kernels at `paths`, from one pass over `batches`: of `[X, 1]`
  (`augmented_gram_reducer`), or of `X` alone with `bias=False` (a projection without a bias).
  Padding counts as `capture.padding` says."""
  rule = "|".join(re.escape(p) for p in paths)
  found = collect(apply_fn, params, batches, rule, {"gram": augmented_gram_reducer()})
  cut = slice(None) if bias else slice(-1)
  return {path: np.asarray(found.stats[path]["gram"])[cut, cut] for path in paths}


def output_grams(
  apply_fn: Any,
  params: Any,
  layers: Sequence[int],
  config: BertConfig,
  batches: Sequence[np.ndarray],
) -> dict[str, np.ndarray]:
  """The augmented Grams of the inputs of `layers`' attention output and feed-forward output
  kernels (`HEAD_INPUT` and `CHANNEL_INPUT` paths), padding tokens left out."""
  paths = [f.format(old) for old in layers for f in (HEAD_INPUT, CHANNEL_INPUT)]
  with padding(config.pad_id):
    return input_grams(apply_fn, params, paths, batches)


def refit_outputs(
  apply_fn: Any,
  params: Any,
  small: dict[str, Any],
  plan: Any,
  config: BertConfig,
  batches: Sequence[np.ndarray],
  *,
  damp: float = REFIT_DAMP,
  grams: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
  """`small` (`minitron.shrink_bert(params, plan, config)`) with every kept layer's attention
  output and feed-forward output projections refitted on `batches` (token ids of the training
  split; padding tokens left out).

  Args:
    apply_fn: the float model's `apply`.
    params: the float param tree the plan was made for.
    small: the shrunk tree (kept layers renumbered `layer_0 ...`).
    plan: the `PruningPlan`.
    config: the float model's `BertConfig`.
    batches: calibration token ids.
    damp: relative damping of the kept Gram.
    grams: `output_grams(...)` of the float model when already collected (covering at least
      the kept layers); collected from `batches` otherwise.
  """
  if grams is None:
    grams = output_grams(apply_fn, params, plan.layers, config, batches)
  d = config.head_size
  out = jax.tree.map(lambda leaf: leaf, small)  # new containers, the same leaves
  for new, (old, hs, cs) in enumerate(zip(plan.layers, plan.heads, plan.channels, strict=True)):
    layer = out["encoder"][f"layer_{new}"]
    original = params["encoder"][f"layer_{old}"]
    cols = head_columns(hs, d)
    for path, kept, target, source in (
      (HEAD_INPUT.format(old), cols, layer["attention"]["output"],
       original["attention"]["output"]),
      (CHANNEL_INPUT.format(old), cs, layer["output"], original["output"]),
    ):  # fmt: skip
      kernel, bias = refit_dense(grams[path], source, kept, damp)
      target["kernel"], target["bias"] = jnp.asarray(kernel), jnp.asarray(bias)
  return out
