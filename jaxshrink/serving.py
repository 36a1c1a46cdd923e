"""Serving modes: how a compressed tree runs, chosen in one place.

A serving mode turns `(apply_fn, ctree)` into the function and params to `jit`:

- `integer`: W8A8/W4A8 kernels run int8 x int8 -> int32 (`quant.quantized_apply`); every
  other encoding is decoded inside `jit`, next to its consumer, and gathered tables decode
  only the rows they look up.
- `bfloat16`: every matmul or conv on a kernel (a param of 2 or more dims, dense or
  compressed) runs bf16 x bf16 accumulating in float32; compressed kernels are decoded to
  bf16 inside `jit`. Everything else (norms, softmax, GELU) stays in the model's dtype. Fast
  where the hardware has bf16 matmuls (GPU, TPU, AVX-512 BF16/AMX CPUs).
- `decode-once`: every encoding is materialized to the float dtype once, at load; the model
  then runs exactly as float. For encodings whose decode costs more inside `jit` than the
  smaller read saves (e.g. unstructured sparsity on a CPU), at the price of float memory.
- `factored`: `LowRank` kernels run as their two thin matmuls (`lowrank_apply`); only for
  trees that hold them.

`measure` times the modes side by side with the float model (interleaved, best of
`repeats`, same batch, same run) and `recommend` picks the fastest. `jaxshrink compress`
records the recommendation in the checkpoint's metrics (`serving`), for a batch and, under
`single`, for one request: the fastest mode depends on the batch size (a bf16 matmul that wins
on a 64-row batch can lose to float on one row, where reading the weights dominates), so
`recorded_mode(recorded, rows)` picks the one measured nearest `rows`. `jaxshrink eval` runs
the one for its `--batch-size` (`--serving MODE` overrides).

>>> served = serve(model.apply, ctree, "integer")
>>> y = served.apply(served.params, x)
>>> y = serve(cmodel, "bfloat16")(x)   # a model in any form (`jaxshrink.model`)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxshrink.bench import calls_per_round, interleaved_best
from jaxshrink.capture import replay_with
from jaxshrink.encoding import Encoding, is_encoding, materialize
from jaxshrink.errors import UsageError
from jaxshrink.model import accepts_models
from jaxshrink.quant.qarray import QArray
from jaxshrink.quant.serve import leaf_paths, lookup_rows, quantized_apply

MODES = ("integer", "bfloat16", "decode-once", "factored")
# The mode used when a checkpoint records none (and the default of `serve`).
DEFAULT_MODE = "integer"
# What reports call `integer` or `decode-once` on a tree with no compressed leaf: both then run
# the float model as it is (they differ only in how they decode compressed leaves), so which of
# the two a timing picked is noise. `bfloat16` still differs there: its matmuls run in bf16.
FLOAT_MODE = "float (no compressed leaf)"
_KERNEL_OPS = ("dot_general", "conv_general_dilated")
ROUND_SECONDS = 0.05


@dataclasses.dataclass(frozen=True)
class Served:
  """A compressed tree ready to run: `apply(params, *args)` is jitted.

  Attributes:
    mode: the serving mode (one of `MODES`).
    apply: the jitted function.
    params: what `apply` takes: the compressed tree, or its decoded copy (`decode-once`).
  """

  mode: str
  apply: Callable[..., Any]
  params: Any

  def __call__(self, *args: Any) -> Any:
    return self.apply(self.params, *args)


def check_mode(mode: Any, *, where: str = "serving mode", fix: str = "") -> str:
  """`mode` if it names a serving mode, else a `UsageError` saying where, what and the fix."""
  if mode not in MODES:
    raise UsageError(
      f"{where}: expected one of {', '.join(MODES)}; got {mode!r}." + (f" {fix}" if fix else "")
    )
  return mode


def has_lowrank(tree: Any) -> bool:
  from jaxshrink.lowrank.encoding import LowRank

  return any(isinstance(leaf, LowRank) for leaf in jax.tree.leaves(tree, is_leaf=is_encoding))


def modes_for(tree: Any) -> tuple[str, ...]:
  """The modes that apply to `tree` (`factored` only with `LowRank` kernels)."""
  return tuple(m for m in MODES if m != "factored" or has_lowrank(tree))


def bfloat16_apply(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply(ctree, *args)`: kernel matmuls and convs in bf16, accumulating in float32.

  Kernels are the params with 2 or more dims; a compressed one is decoded straight to bf16.
  A kernel the model reshapes or transposes before its matmul, or contracts with batch
  dimensions, runs as the model wrote it (in its own dtype): only direct uses are changed.
  Quantized embedding tables still decode only the gathered rows.
  """

  def apply(ctree, *args):
    leaves, treedef = jax.tree.flatten(ctree, is_leaf=is_encoding)
    names = leaf_paths(ctree)
    tables = {names[i]: leaf for i, leaf in enumerate(leaves) if isinstance(leaf, QArray)}
    kernels = {i: names[i] for i, leaf in enumerate(leaves) if len(leaf.shape) >= 2}
    params = jax.tree.unflatten(treedef, [_decoded(leaf) for leaf in leaves])

    def substitute(eqn, invals, in_src):
      name = eqn.primitive.name
      if name == "gather" and isinstance(in_src[0], str) and in_src[0] in tables:
        return lookup_rows(eqn.params, invals, tables[in_src[0]])
      if name not in _KERNEL_OPS or not any(isinstance(s, str) for s in in_src[:2]):
        return None
      if name == "dot_general" and any(eqn.params["dimension_numbers"][1]):
        return None  # batched matmul (attention-style): left as written
      out_dtype = eqn.outvars[0].aval.dtype
      if not jnp.issubdtype(out_dtype, jnp.floating):
        return None
      bound = dict(eqn.primitive.get_bind_params(eqn.params))
      bound["preferred_element_type"] = jnp.float32
      lhs, rhs = (v.astype(jnp.bfloat16) for v in invals[:2])
      return [eqn.primitive.bind(lhs, rhs, *invals[2:], **bound).astype(out_dtype)]

    return replay_with(apply_fn, params, args, kernels, substitute)

  return apply


def _decoded(leaf: Any) -> Any:
  """A compressed kernel as bf16 (the cast fuses into the decode), other leaves as they are."""
  if not isinstance(leaf, Encoding):
    return leaf
  value = leaf.materialize()
  return value.astype(jnp.bfloat16) if len(leaf.shape) >= 2 else value


@accepts_models(result="as_is")
def serve(apply_fn: Callable[..., Any], ctree: Any, mode: str = DEFAULT_MODE) -> Served:
  """`ctree` ready to run in serving mode `mode` (see the module docstring).

  Args:
    apply_fn: the model's `(params, *args) -> outputs`, or a model that holds its tree (an
      nnx module, a `Compressed` one, `Linen(module, variables)`): then leave `ctree` out,
      `serve(cmodel, "bfloat16")` (`jaxshrink.model`).
    ctree: a compressed (or float) param tree.
    mode: one of `MODES`.

  Raises:
    UsageError: unknown mode, or `factored` on a tree without `LowRank` kernels.
  """
  check_mode(mode)
  if mode == "integer":
    return Served(mode, jax.jit(quantized_apply(apply_fn)), ctree)
  if mode == "bfloat16":
    return Served(mode, jax.jit(bfloat16_apply(apply_fn)), ctree)
  if mode == "decode-once":
    return Served(mode, jax.jit(apply_fn), jax.block_until_ready(jax.jit(materialize)(ctree)))
  if not has_lowrank(ctree):
    raise UsageError(
      "Serving mode `factored` runs LowRank kernels as two matmuls, and this tree holds none; "
      f"use one of {', '.join(m for m in MODES if m != 'factored')}."
    )
  from jaxshrink.lowrank import lowrank_apply

  return Served(mode, jax.jit(lowrank_apply(apply_fn)), ctree)


@dataclasses.dataclass(frozen=True)
class Timing:
  """Interleaved timings of serving modes against float, on one batch, in one run.

  Attributes:
    seconds_per_batch: `{mode or "float": best seconds}`.
    time_vs_float: `{mode: seconds / float seconds}`.
    batch_shape: shape of the timed input.
  """

  seconds_per_batch: dict[str, float]
  time_vs_float: dict[str, float]
  batch_shape: tuple[int, ...]

  def fastest(self) -> str:
    return min(self.time_vs_float, key=self.time_vs_float.get)

  def to_json(self, mode: str | None = None) -> dict[str, Any]:
    """The recorded form: every mode's ratio, and `mode`'s own figures when given."""
    out: dict[str, Any] = {
      "batch_shape": list(self.batch_shape),
      "backend": jax.default_backend(),
      "time_vs_float_by_mode": dict(self.time_vs_float),
      "float_seconds_per_batch": self.seconds_per_batch["float"],
    }
    if mode is not None:
      out.update(
        serving_mode=mode,
        seconds_per_batch=self.seconds_per_batch[mode],
        time_vs_float=self.time_vs_float[mode],
      )
    return out


def measure(
  apply_fn: Callable[..., Any],
  ctree: Any,
  float_params: Any,
  args: tuple,
  *,
  modes: Sequence[str] | None = None,
  repeats: int = 5,
  float_apply: Callable[..., Any] | None = None,
) -> Timing:
  """Times `ctree` in each serving mode and the float model, interleaved.

  Every function is compiled first; then each round runs each one once, and the best round
  counts, so a load change on the machine hits all of them alike.

  Args:
    apply_fn: the model's apply.
    ctree: the compressed tree.
    float_params: the float params it was compressed from (the baseline).
    args: the batch, as the positional arguments after params.
    modes: the modes to time (default: `modes_for(ctree)`).
    repeats: rounds.
    float_apply: the float model's apply, when it is another model (a distilled student is
      timed against its teacher); default `apply_fn`.
  """
  modes = modes_for(ctree) if modes is None else tuple(check_mode(m) for m in modes)
  runs = {"float": Served("float", jax.jit(float_apply or apply_fn), float_params)}
  runs.update({m: serve(apply_fn, ctree, m) for m in modes})
  for run in runs.values():
    jax.block_until_ready(run(*args))
  # Calls per timed round: about `ROUND_SECONDS` of the float model, so a batch of a few
  # milliseconds is not measured against the timer's and the scheduler's noise.
  calls = calls_per_round(functools.partial(runs["float"], *args), ROUND_SECONDS)
  best = interleaved_best({n: functools.partial(run, *args) for n, run in runs.items()},
                          repeats, calls)  # fmt: skip
  ratios = {m: round(best[m] / best["float"], 4) for m in modes}
  shape = tuple(jnp.shape(jax.tree.leaves(args)[0])) if jax.tree.leaves(args) else ()
  # Six significant digits, not six decimals: a sub-millisecond batch would lose its precision
  # (and its ratio to float) to an absolute rounding.
  return Timing({k: float(f"{v:.6g}") for k, v in best.items()}, ratios, shape)


# A recorded single-request mode serves batches of up to this many rows: the geometric middle
# of the two row counts `compress` times (1 and `evaluation.SERVING_BATCH`, 64).
SINGLE_MAX_ROWS = 8


def recorded_mode(recorded: dict[str, Any], rows: int, *, source: str = "the checkpoint") -> str:
  """The mode a checkpoint's `metrics.serving` record recommends for batches of `rows` rows.

  Its `single` entry (timed on one row) serves up to `SINGLE_MAX_ROWS` rows; the batch mode
  serves larger batches, and every batch when the record has no `single`. The mode is checked
  (the manifest is untrusted input); a bad one is a `UsageError` naming `source`.
  """
  single = recorded.get("single")
  key = "single.serving_mode" if rows <= SINGLE_MAX_ROWS and isinstance(single, dict) else None
  return check_mode(
    single.get("serving_mode") if key else recorded.get("serving_mode"),
    where=f"`metrics.serving.{key or 'serving_mode'}` recorded in {source}",
    fix="Pass --serving MODE to choose one.",
  )


def mode_label(mode: str, compressed: bool) -> str:
  """How reports name serving mode `mode` for a tree with (or without) compressed leaves."""
  return FLOAT_MODE if not compressed and mode in ("integer", "decode-once") else mode


def recommend(
  apply_fn: Callable[..., Any], ctree: Any, float_params: Any, args: tuple, *, repeats: int = 5
) -> tuple[str, Timing]:
  """The fastest serving mode for `ctree` on this backend, and the timings it was chosen by."""
  timing = measure(apply_fn, ctree, float_params, args, repeats=repeats)
  return timing.fastest(), timing
