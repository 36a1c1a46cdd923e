"""The teacher-student training step: one `jax.jit` per step, any optax optimizer.

The teacher is any pure `apply(params, x)` with its own params, which may be a
compressed tree (decoded inside the jitted step, so only the compact form is
resident). It runs under `stop_gradient`. The student is a pure apply function
(a zoo model's, a linen module's or an nnx module's; see `functional`), so a
student built with a QAT `dot_general`, or trained with a pruning optax
wrapper as `optimizer`, distills in the same loop.

>>> step = distill_step(student.apply, teacher.apply, optax.adam(1e-3), DistillLoss())
>>> state = step.init(student_params, teacher_params, x[:1], key=jax.random.key(0))
>>> state, metrics = step.step(state, teacher_params, x, y)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxshrink.distill.objective import DistillLoss, model_outputs
from jaxshrink.encoding import materialize
from jaxshrink.errors import InvalidTypeError, InvalidValueError
from jaxshrink.model import functional as functional


class DistillState(NamedTuple):
  params: Any  # the student's params (same structure the student apply takes)
  opt_state: Any  # `optimizer` state over `params`
  loss_params: Any  # learned projections: {pair name: {"kernel": (Ds, Dt), "bias": (Dt,)}}
  loss_opt_state: Any  # `loss_optimizer` state over `loss_params`
  step: jax.Array  # () int32, steps taken


class DistillStep(NamedTuple):
  """`init(student_params, teacher_params, x, *, key) -> DistillState` and the jitted
  `step(state, teacher_params, x, y=None, mask=None, key=None) -> (state, metrics)`."""

  init: Callable[..., DistillState]
  step: Callable[..., tuple[DistillState, dict[str, jax.Array]]]


def _copy(tree: Any) -> Any:
  """A fresh device buffer for every array leaf of `tree`."""
  return jax.tree.map(lambda a: jnp.array(a, copy=True) if hasattr(a, "shape") else a, tree)


def _owned(state: DistillState) -> DistillState:
  """Copies every leaf that shares its buffer with an earlier leaf.

  Optimizer states may hold the params themselves (lookahead's slow weights, EMA), and one
  buffer cannot be donated twice.
  """
  seen: set[int] = set()

  def own(leaf):
    if not isinstance(leaf, jax.Array):
      return leaf
    if id(leaf) in seen:
      return jnp.array(leaf, copy=True)
    seen.add(id(leaf))
    return leaf

  return jax.tree.map(own, state)


def distill_step(
  student_apply: Callable[[Any, Any], Any],
  teacher_apply: Callable[[Any, Any], Any],
  optimizer: optax.GradientTransformation,
  loss: DistillLoss | None = None,
  *,
  loss_optimizer: optax.GradientTransformation | None = None,
  augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
  donate: bool = True,
) -> DistillStep:
  """Builds the distillation training step.

  Args:
    student_apply: `(params, x) -> logits` or `-> {"logits": ..., <intermediates>}`.
    teacher_apply: same contract, for the teacher's params (dense or compressed tree).
    optimizer: any optax transform for the student (a pruning wrapper, a schedule, ...);
      `update` gets the params as its third argument.
    loss: the objective; default `DistillLoss()` (Hinton KD, T=4, alpha=0.9).
    loss_optimizer: trains the learned projections; default `optax.adam(1e-3)`.
    augment: optional `(key, x) -> x` applied inside the step; the teacher sees the same
      augmented batch (Hinton's transfer set).
    donate: donate the state's buffers to the step, so it updates them in place. `init`
      copies the student params, so the state owns every buffer it donates: the arrays the
      caller passed stay readable and unchanged. A state built by hand (not by `init`) is
      donated as is: pass `donate=False` to keep its arrays.

  Returns:
    `DistillStep(init, step)`. `step(state, teacher_params, x, y=None, mask=None, key=None)`
    returns the new state and `{"loss": (), <term>: ()}` float32 metrics.
  """
  loss = DistillLoss() if loss is None else loss
  if not isinstance(loss, DistillLoss):
    raise InvalidTypeError(f"`loss` must be a DistillLoss; got {type(loss).__name__}.")
  if not isinstance(optimizer, optax.GradientTransformation):
    raise InvalidTypeError(
      f"`optimizer` must be an optax.GradientTransformation; got {type(optimizer).__name__}."
    )
  loss_optimizer = optax.adam(1e-3) if loss_optimizer is None else loss_optimizer

  def init(student_params: Any, teacher_params: Any, x: Any, *, key: jax.Array) -> DistillState:
    s_out = jax.eval_shape(student_apply, student_params, x)
    t_out = jax.eval_shape(lambda p, x: teacher_apply(materialize(p), x), teacher_params, x)
    loss_params = loss.init(key, s_out, t_out)
    # The state owns its buffers: the step donates them, and donating the caller's arrays
    # would delete the params they passed in.
    params = _copy(student_params)
    return _owned(
      DistillState(
        params=params,
        opt_state=optimizer.init(params),
        loss_params=loss_params,
        loss_opt_state=loss_optimizer.init(loss_params),
        step=jnp.zeros((), jnp.int32),
      )
    )

  def step(state, teacher_params, x, y=None, mask=None, key=None):
    if augment is not None:
      if key is None:
        raise InvalidValueError("this step augments its inputs: pass `key=`.")
      x = augment(jax.random.fold_in(key, state.step), x)
    teacher_out = teacher_apply(materialize(teacher_params), x)
    teacher_out = jax.tree.map(jax.lax.stop_gradient, model_outputs(teacher_out, "teacher"))

    def objective(params, loss_params):
      student_out = model_outputs(student_apply(params, x), "student")
      total, terms = loss(loss_params, student_out, teacher_out, y, mask)
      return total, terms

    (total, terms), (grads, loss_grads) = jax.value_and_grad(
      objective, argnums=(0, 1), has_aux=True
    )(state.params, state.loss_params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    loss_updates, loss_opt_state = loss_optimizer.update(
      loss_grads, state.loss_opt_state, state.loss_params
    )
    new_state = DistillState(
      params=optax.apply_updates(state.params, updates),
      opt_state=opt_state,
      loss_params=optax.apply_updates(state.loss_params, loss_updates),
      loss_opt_state=loss_opt_state,
      step=state.step + 1,
    )
    return new_state, {"loss": total, **terms}

  return DistillStep(init=init, step=jax.jit(step, donate_argnums=(0,) if donate else ()))
