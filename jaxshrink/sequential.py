"""Sequential calibration: compress a model block by block, in the order its forward runs.

A one-pass calibrated method collects every kernel's statistics from the float model at once,
so it holds all of them in memory together (a `K x K` Hessian per kernel for GPTQ and
SparseGPT), and each kernel is fitted to inputs the compressed model will never produce.
Sequentially, the kernels are grouped into blocks (a transformer layer: every kernel under the
first numbered path component, `encoder/layer_3/...`, `block_0/...`; otherwise each kernel is a
block of its own), the blocks are ordered by when the forward first reads them, and each block
is calibrated and compressed on the model whose earlier blocks are already compressed
(`capture.collect` runs the compressed tree). Only one block's statistics are alive at a time.
A kernel stacked over the layers of a `scan` is one block: its layers share one rolled loop.

Each block aims at the float model, not at the compressed one it runs in. With the rows
of `X` the inputs a kernel meets in the compressed model and `X_f` those of the float model,
calibrating on `X` alone fits `X W' ≈ X W` and keeps the error the earlier blocks carried in;
the target is the float model's own output `X_f W` (the asymmetric objective
`||X_f W - X W'||²`, as GPTAQ, arXiv:2504.02692, poses it). Its unconstrained optimum is
`W* = W + (XᵀX)⁻¹ Xᵀ(X_f - X) W`, and the objective equals `||X W* - X W'||²` plus a
constant, so GPTQ and SparseGPT fit `W*` with the usual Hessian (`float_target`), and AWQ
searches its scales for `W*`, its loss being the same quadratic form. That needs
one more statistic per kernel, `Xᵀ(X_f - X)`, which pairs the rows of the two forwards
(`paired_statistics`); on the first block it is zero and all is as without it. The correction
is applied in part (`PULL`): fitted in full on a few calibration rows it overfits.

Wanda never updates a weight, so it cannot move toward `W*`; it chooses among masks instead.
Its ranking `|w|·‖x‖` takes the input norms of the compressed model, of the float model (one
pass's ranking) or their geometric mean, whichever mask leaves the kernel's output closest to
the float model's on the calibration rows (`float_output_error`). Ranking by the error against
the float output directly (`w² ‖x‖² + 2 w ⟨x, r⟩`, `r` the carried-in error) fails: the second
term adds up over the half of a layer removed at once (digits-cnn at 50%, a tenth of that
term: 0.82 accuracy against at least 0.9 without it), and removing in rounds that recompute
`r` made it worse (tiny-lm perplexity 62 in four rounds).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.capture import (
  Site,
  check_finite,
  collect,
  find_sites,
  from_matrix,
  input_rows,
  kernel_matrix,
)
from jaxshrink.encoding import materialize
from jaxshrink.errors import JaxshrinkError
from jaxshrink.hessian import damped
from jaxshrink.tree import flatten, paths_rule

_NUMBERED = re.compile(r".*\d$")

# How far a kernel is moved toward the float model's outputs (see the module docstring). The
# full least-squares correction (1.0) overfits: it regresses a K-wide input on a few thousand
# calibration rows (MiniLM GPTQ int3 g32: 0.9074 mean cosine against 0.9593 one pass).
# A quarter of it beat one pass on every GPTQ, SparseGPT and AWQ row measured (MiniLM GPTQ
# 0.9601, SparseGPT 2:4 0.8500; tiny-lm GPTQ 4.8077 perplexity against 4.8097, AWQ 4.8978
# against 4.9386).
PULL = 0.25

# Examples per paired forward: a calibration batch runs in pieces of this size, since the
# paired pass holds both forwards' inputs of a block's kernels at once. MiniLM, batches of
# 128 sentences, peak RSS of a whole `prune` recipe run (evaluation included) whole / in
# pieces of 32: sequential SparseGPT 50% 1461 / 1145 MB, Wanda 50% 1185 / 997 MB.
PAIRED_EXAMPLES = 32

# The damping of the solve in `float_target`, a fraction of the mean diagonal: GPTQ's default,
# for methods that have no `damp` of their own (AWQ).
DAMP = 0.01


def block_of(path: str) -> str:
  """The block a kernel belongs to: its path up to the first numbered component, or itself.

  >>> block_of("encoder/layer_3/attention/query/kernel"), block_of("conv1/kernel")
  ('encoder/layer_3', 'conv1/kernel')
  """
  parts = path.split("/")
  for i, part in enumerate(parts[:-1]):
    if _NUMBERED.fullmatch(part) and i + 1 < len(parts) - 1:
      return "/".join(parts[: i + 1])
  return path


def blocks(
  apply_fn: Callable[..., Any], tree: Any, x: Any, paths: Iterable[str]
) -> list[list[str]]:
  """`paths` grouped into blocks, blocks in the order the forward first reads them.

  Only shapes are traced (`find_sites` on the decoded tree's shapes); kernels the forward
  never reads come last, each alone.
  """
  paths = list(paths)
  shapes = jax.eval_shape(materialize, tree)
  order = list(find_sites(apply_fn, shapes, np.asarray(x), rule=paths_rule(paths), in_order=True))
  order += [p for p in paths if p not in order]
  grouped: dict[str, list[str]] = {}
  for path in order:
    grouped.setdefault(block_of(path), []).append(path)
  return list(grouped.values())


@dataclasses.dataclass(frozen=True)
class Paired:
  """One kernel's statistics on the compressed model's inputs `X` and the float model's `X_f`.

  Attributes:
    gram: `Σ xᵀx` over the rows of `X`, `(K, K)` (`(L, K, K)` for a stacked kernel).
    cross: `Σ xᵀ(x_f - x)`, row by row, same shape; zero where the two inputs agree.
    count: the rows summed (padding left out), `()` or `(L,)`.
    site: where the kernel is consumed.
    float_sq: `Σ x_f²` per input, `(K,)` (`(L, K)`): the float model's input norms, squared.
  """

  gram: jax.Array
  cross: jax.Array
  count: jax.Array
  site: Site
  float_sq: jax.Array

  def hessian(self) -> jax.Array:
    """`2/count · gram`, the layer Hessian GPTQ and SparseGPT use (`hessian_from_gram`)."""
    count = self.count if self.site.layers is None else self.count[:, None, None]
    return (2.0 / count) * self.gram


def _pieces(x: Any) -> Iterable[Any]:
  """`x` in runs of at most `PAIRED_EXAMPLES` examples along its leading axis (whole when its
  leaves do not share one)."""
  leaves = jax.tree.leaves(x)
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes:
    yield x
    return
  (n,) = sizes
  for start in range(0, n, PAIRED_EXAMPLES):
    yield jax.tree.map(lambda a, s=start: a[s : s + PAIRED_EXAMPLES], x)


def paired_statistics(
  apply_fn: Callable[..., Any], reference: Any, tree: Any, batches: Iterable[Any], paths: list[str]
) -> dict[str, Paired]:
  """`Paired` statistics of the kernels at `paths`: `tree` (the model as compressed so far)
  and `reference` (the float model) run on the same batches, their inputs paired row by row.

  Only `paths`' inputs are kept, one piece of a batch at a time (`PAIRED_EXAMPLES` examples,
  inside one `jit`), so memory holds one block's activations of that piece, twice.
  """
  selected, batches = set(paths), list(batches)
  reference, tree = materialize(reference), materialize(tree)
  sites: dict[str, Site] = {}

  def step(reference, tree, x):
    float_rows, _ = input_rows(apply_fn, reference, x, selected)
    rows, found = input_rows(apply_fn, tree, x, selected)
    sites.update(found)
    out = {}
    for key, uses in rows.items():
      if len(uses) != len(float_rows.get(key, ())):
        raise JaxshrinkError(f"`{key[0]}` is used differently by the float and compressed trees.")
      gram = cross = count = float_sq = 0.0
      for (x_c, w), (x_f, _) in zip(uses, float_rows[key], strict=True):
        weighted = x_c * w[:, None]
        gram = gram + weighted.T @ x_c
        cross = cross + weighted.T @ (x_f - x_c)
        count = count + jnp.sum(w)
        float_sq = float_sq + jnp.sum(x_f * x_f * w[:, None], axis=0)
      out[f"{key[0]}|{key[1]}"] = (gram, cross, count, float_sq)
    return out

  jitted = jax.jit(step)
  totals: dict[str, Any] = {}
  for index, x in enumerate(batches):
    check_finite(x, index)
    for piece in _pieces(x):
      part = jitted(reference, tree, piece)
      totals = jax.tree.map(jnp.add, totals, part) if totals else part
  if not batches:
    raise JaxshrinkError("The calibration set is empty; pass at least one batch.")
  if set(paths) - set(sites):
    # Calibration's own pass names what the kernel passes through instead (embedding, loop).
    collect(apply_fn, tree, batches[:1], paths_rule(sorted(set(paths) - set(sites))), {})
    raise JaxshrinkError(f"Calibration found no matmul for {sorted(set(paths) - set(sites))}.")
  out = {}
  for path in paths:
    site = sites[path]
    layers = [None] if site.layers is None else range(site.layers)
    stats = [totals[f"{path}|{layer}"] for layer in layers]
    gram, cross, count, float_sq = (
      stats[0] if site.layers is None else [jnp.stack(s) for s in zip(*stats, strict=True)]
    )
    out[path] = Paired(gram, cross, count, site, float_sq)
  return out


@jax.jit
def _solve(gram: jax.Array, rhs: jax.Array, damp: jax.Array) -> jax.Array:
  """`(gram + damp · mean(diag) · I)⁻¹ rhs`, damped as GPTQ damps its Hessian."""
  return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(damped(gram, damp)), rhs)


def float_target(
  w2d: jax.Array,
  gram: jax.Array,
  cross: jax.Array,
  damp: float,
  pull: float = PULL,
  *,
  path: str = "<array>",
) -> jax.Array:
  """`(K, N)` weights moved toward those that best map the compressed model's inputs to the
  float outputs: `W + pull · (G + λI)⁻¹ C W` (`G = gram`, `C = cross`, λ as GPTQ's damping;
  `pull = 1` is the least-squares optimum). Exact zeros (pruned by an earlier stage) stay zero;
  where the solve fails (NaN), the weights are returned unchanged, with a warning naming
  `path`: the kernel is then fitted to its own outputs, as in one pass."""
  w2d = jnp.asarray(w2d, jnp.float32)
  shift = pull * _solve(gram, cross @ w2d, jnp.float32(damp))
  if not bool(jnp.all(jnp.isfinite(shift))):
    warnings.warn(
      f"Sequential calibration of `{path}`: the damped Gram matrix of its inputs is not "
      f"positive definite at damp={damp:g}, so the kernel is not moved toward the float "
      "model's outputs (it is fitted to its own, as in one pass). Pass a larger `damp` or more "
      "calibration data.",
      stacklevel=2,
    )
    return w2d
  return jnp.where(w2d == 0, 0.0, w2d + shift)


@jax.jit
def float_output_error(w2d: jax.Array, kept: jax.Array, gram: jax.Array, cross: jax.Array):
  """`||X_f W - X W'||²` less `||X_f W||²` (which does not depend on `W'`), from the paired
  statistics: `tr(W'ᵀ G W') - 2 tr(W'ᵀ (G + C) W)`, since `Xᵀ X_f = G + C`. `w2d` is the
  kernel `W` and `kept` the candidate `W'`, both `(K, N)`; lower is closer to the float
  model's outputs on the calibration rows."""
  w2d, kept = w2d.astype(jnp.float32), kept.astype(jnp.float32)
  return jnp.sum(kept * (gram @ kept)) - 2.0 * jnp.sum(kept * ((gram + cross) @ w2d))


def fitted(
  apply_fn: Callable[..., Any],
  reference: Any,
  tree: Any,
  batches: Iterable[Any],
  paths: list[str],
  *,
  damp: float = DAMP,
  pull: float = PULL,
) -> dict[str, tuple[jax.Array, jax.Array, Site]]:
  """What GPTQ and SparseGPT fit for each kernel at `paths`, sequentially: `(kernel, hessian,
  site)`, the kernel being `float_target` in the kernel's own layout and dtype and the Hessian
  that of its inputs in `tree` (one per layer of a stacked kernel)."""
  stats = paired_statistics(apply_fn, reference, tree, batches, paths)
  flat = flatten(materialize(tree))
  out = {}
  for path, paired in stats.items():
    site = paired.site
    kernels = [
      from_matrix(
        float_target(kernel_matrix(w, site.contract_dims), gram, cross, damp, pull, path=path),
        w.shape,
        site.contract_dims,
      ).astype(w.dtype)
      for w, gram, cross in zip(
        site.per_layer(flat[path]), site.per_layer(paired.gram), site.per_layer(paired.cross),
        strict=True,
      )
    ]  # fmt: skip
    out[path] = (kernels[0] if site.layers is None else jnp.stack(kernels), paired.hessian(), site)
  return out
