"""One optax transformation that prunes while the user's optimizer trains.

Wrap the optimizer once; the training loop stays as it is:

>>> tx = pruning(optax.adam(1e-3), Pruner(".*kernel", sparsity=0.9),
...              polynomial_schedule(begin=0, end=500, frequency=50))
>>> opt_state = tx.init(params)
>>> updates, opt_state = tx.update(grads, opt_state, params)   # inside your jitted step
>>> params = optax.apply_updates(params, updates)              # pruned weights are exactly 0

Each `update`:
1. at schedule steps, recomputes the masks from the current params (inside
   `jit`, via `lax.cond`, so other steps pay nothing for it);
2. zeroes the inner optimizer's state (Adam moments, momentum, ...) of every
   weight whose mask changed, so pruned weights keep zero moments and regrown
   weights start fresh;
3. masks the gradients, runs the inner optimizer, and replaces the update of a
   pruned weight by `-w`, so `optax.apply_updates` leaves exactly `0.0`.

The wrapper must be the outermost transform: whatever follows it in an `optax.chain`
(weight decay, clipping, a scale) changes those `-w` updates and pruned weights drift
away from zero. Wrap the whole chain instead:

>>> tx = pruning(optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-4),
...                          optax.adam(1e-3)), pruner, schedule)

Each `update` also counts the pruned weights that are non-zero in the params it is
given (on device, no host sync; `PruneState.leaked`). Outside `jit` it raises at once;
inside, `check_pruned(params, opt_state)` raises naming the leaf: call it after training
or at checkpoints.

Masks live in the optimizer state (`PruneState.masks`, bool). With
`nnx.Optimizer` the same transformation works unchanged; `tag_masks` gives
the masks their own `PruneMask` variable type there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxshrink.errors import InvalidValueError, JaxshrinkError
from jaxshrink.sparsity.allocation import Pruner, check_masks
from jaxshrink.sparsity.schedules import Schedule, one_shot_schedule
from jaxshrink.tree import flatten

# (params, grads, masks, step, key) -> new masks; traced inside jit.
MaskUpdate = Callable[[Any, Any, Any, jax.Array, jax.Array], Any]


class PruneState(NamedTuple):
  count: jax.Array  # () int32, number of updates so far
  masks: Any  # bool, same structure as params (() True for leaves never pruned)
  key: jax.Array  # (2,) uint32 raw PRNG key for random criteria and SET
  inner_state: Any  # the wrapped optimizer's state
  # () int32 per leaf, same structure as `masks`: pruned weights found non-zero in the params
  # given to `update` (the largest count seen; 0 while the wrapper is the outermost transform).
  leaked: Any


# Raised from more than one place (eagerly in `update`, and by `check_pruned`).
LEAK_MESSAGE = (
  "{count} pruned weight(s) of `{path}` are non-zero {where}, although the pruning wrapper set "
  "them to exactly 0.0: a transform after it changed its updates (e.g. "
  "`optax.chain(pruning(...), optax.add_decayed_weights(...))`, or clipping after it). Make "
  "`pruning(...)` the outermost transform: wrap the chain, not a link of it, e.g. "
  "`pruning(optax.chain(optax.add_decayed_weights(1e-4), optax.adam(1e-3)), pruner)`."
)


class PruneMask(nnx.Variable):
  """NNX variable type of pruning masks, so `wrt=nnx.Param` filters never train them."""


def _unwrap(tree: Any) -> Any:
  """Plain arrays from a tree that `nnx.Optimizer` may have wrapped in variables."""
  return jax.tree.map(
    lambda v: v.get_value() if isinstance(v, nnx.Variable) else v,
    tree,
    is_leaf=lambda v: isinstance(v, nnx.Variable),
  )


def _pruned_nonzeros(params: Any, masks: Any) -> Any:
  """() int32 per leaf: how many weights outside the mask are not exactly zero."""
  return jax.tree.map(
    lambda w, m: jnp.sum(jnp.logical_and(jnp.logical_not(m), w != 0), dtype=jnp.int32),
    params,
    masks,
  )


def _raise_leaks(counts: dict[str, Any], where: str) -> None:
  """Raises `LEAK_MESSAGE` for the first `{path: count}` entry above zero."""
  for path, count in counts.items():
    if int(count):
      raise JaxshrinkError(LEAK_MESSAGE.format(count=int(count), path=path, where=where))


def _reset_inner(inner: optax.GradientTransformation, state: Any, keep: Any) -> Any:
  """Zeroes every params-shaped part of `state` where `keep` is False."""

  def zero(value, mask):
    if not hasattr(value, "dtype") or not jnp.issubdtype(value.dtype, jnp.inexact):
      return value
    return jnp.where(mask, value, jnp.zeros((), value.dtype))

  return optax.tree_utils.tree_map_params(inner, zero, state, keep)


def pruning(
  inner: optax.GradientTransformation,
  pruner: Pruner,
  schedule: Schedule | None = None,
  *,
  masks: Any = None,
  mask_update: MaskUpdate | None = None,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so training keeps the params sparse, following `schedule`.

  Args:
    inner: the user's optimizer.
    pruner: what to prune (rule, sparsity, structure, criterion, allocation).
    schedule: when masks update and how sparse they are; default: one-shot at step 0, or,
      when `masks` are given, never (the masks stay fixed: sparsity-preserving fine-tuning
      or QAT).
    masks: initial masks (e.g. from a one-shot method), bool tree like the params;
      default: all weights kept until the first scheduled update.
    mask_update: replaces the schedule's re-ranking, e.g. RigL drop-and-grow
      (`jaxshrink.sparsity.rigl`).
    seed: seed of the key used by the `random` criterion and SET.

  Returns:
    An optax transformation whose `update` needs `params`.
  """
  if schedule is None and masks is None:
    schedule = one_shot_schedule(0)
  if pruner.criterion == "wanda":
    raise InvalidValueError(
      "The pruning wrapper cannot score with 'wanda' (it needs calibration activations); "
      "prune once with jaxshrink.sparsity.wanda and pass masks=pruned_masks(pruned, pruner), "
      "or use 'magnitude'."
    )
  inner = optax.with_extra_args_support(inner)

  def default_update(params, grads, masks, step, key):
    del masks
    return pruner.masks(
      params, schedule.fraction(step), grads=grads, key=jax.random.wrap_key_data(key)
    )

  update_masks = mask_update or default_update

  def init(params):
    if masks is None:
      start = pruner.dense_masks(params)
    else:
      check_masks(params, masks)
      start = masks
    start = jax.tree.map(lambda m: jnp.asarray(m, bool), start)
    return PruneState(
      count=jnp.zeros((), jnp.int32),
      masks=start,
      key=jax.random.key_data(jax.random.key(seed)),
      inner_state=inner.init(params),
      leaked=jax.tree.map(lambda _: jnp.zeros((), jnp.int32), start),
    )

  def update(updates, state, params=None, **extra):
    if params is None:
      raise InvalidValueError(
        "The pruning wrapper needs the params: call tx.update(grads, opt_state, params)."
      )
    step = state.count
    # After a step of this wrapper the pruned weights are exactly 0.0 unless something after
    # it changed the updates. Step 0 is exempt: given `masks` may not be applied yet.
    found = jax.tree.map(lambda n: jnp.where(step > 0, n, 0), _pruned_nonzeros(params, state.masks))
    if not any(isinstance(n, jax.core.Tracer) for n in jax.tree.leaves(found)):
      _raise_leaks(flatten(found), f"in the params given to update at step {int(step)}")
    leaked = jax.tree.map(jnp.maximum, state.leaked, found)
    key = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.key), step))
    if schedule is None:  # fixed masks: nothing to recompute or reset
      new_masks, inner_state = state.masks, state.inner_state
    else:
      due = schedule.is_update(step)
      new_masks = jax.lax.cond(
        due,
        lambda: jax.tree.map(
          lambda m: m.astype(bool), update_masks(params, updates, state.masks, step, key)
        ),
        lambda: state.masks,
      )
      stable = jax.tree.map(jnp.logical_and, new_masks, state.masks)
      inner_state = jax.lax.cond(
        due, lambda: _reset_inner(inner, state.inner_state, stable), lambda: state.inner_state
      )
    grads = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros((), g.dtype)), updates, new_masks)
    out, inner_state = inner.update(grads, inner_state, params, **extra)
    out = jax.tree.map(lambda u, w, m: jnp.where(m, u, -w).astype(u.dtype), out, params, new_masks)
    return out, PruneState(step + 1, new_masks, state.key, inner_state, leaked)

  return optax.GradientTransformationExtraArgs(init, update)


def _find_state(opt_state: Any) -> PruneState:
  found = []

  def visit(node):
    if isinstance(node, PruneState):
      found.append(node)
      return True
    return False

  jax.tree.leaves(opt_state, is_leaf=visit)
  if not found:
    raise InvalidValueError(
      "No PruneState in this optimizer state: build the optimizer with "
      "jaxshrink.sparsity.pruning(...) (or rigl / set_training)."
    )
  return found[0]


def masks_of(opt_state: Any) -> Any:
  """The current masks inside an optimizer state (plain optax or `nnx.Optimizer.opt_state`)."""
  return _unwrap(_find_state(opt_state).masks)


def check_pruned(params: Any, opt_state: Any) -> None:
  """Raises if a pruned weight is non-zero now, or was at any `update` so far.

  `update` counts, inside `jit` and without a host sync, the pruned weights that are non-zero
  in the params it gets; this reads those counts and checks `params` against the current
  masks. A non-zero count means a transform after the wrapper changed its updates.

  Args:
    params: the params after the last `optax.apply_updates` (a dict or `nnx.State`).
    opt_state: the state of the `pruning(...)` optimizer (plain optax or
      `nnx.Optimizer.opt_state`).

  Raises:
    JaxshrinkError: naming the first leaf with non-zero pruned weights, and the fix.

  >>> params, opt_state = train(params, opt_state)   # your loop
  >>> check_pruned(params, opt_state)                # pruned weights are exactly 0.0
  """
  state = _find_state(opt_state)
  masks = _unwrap(state.masks)
  check_masks(params, masks)
  # By path, so an `nnx.State` of params checks against the plain mask tree.
  flat_p, flat_m = flatten(params), flatten(masks)
  _raise_leaks({p: _pruned_nonzeros(flat_p[p], m) for p, m in flat_m.items()}, "in these params")
  _raise_leaks(flatten(_unwrap(state.leaked)), "in the params given to an earlier update")


def tag_masks(optimizer: nnx.Optimizer) -> nnx.Optimizer:
  """Re-types the mask leaves of an `nnx.Optimizer`'s state as `PruneMask` variables.

  `nnx.Optimizer` wraps every optimizer-state array as `OptArray`; this makes the
  masks distinguishable (`nnx.state(optimizer, PruneMask)`), and `update` keeps
  writing them in place.

  >>> optimizer = tag_masks(nnx.Optimizer(model, pruning(optax.adam(1e-3), pruner), wrt=nnx.Param))
  """

  def retag(node):
    if isinstance(node, PruneState):
      masks = jax.tree.map(
        lambda v: PruneMask(v.get_value() if isinstance(v, nnx.Variable) else v),
        node.masks,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
      )
      return node._replace(masks=masks)
    return node

  state = optimizer.opt_state
  optimizer.opt_state = jax.tree.map(retag, state, is_leaf=lambda n: isinstance(n, PruneState))
  return optimizer
