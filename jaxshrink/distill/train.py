"""`distill`: train a student from a teacher on a dataset's training split.

A thin loop over `distill_step`: the whole training set lives on device and
each jitted step gathers its batch by index. `transfer_size` restricts the
transfer set to a seeded subset of the training split, the regime where soft
targets carry the most information (Hinton et al. §3).

>>> params = distill(get_model("digits-mlp"), teacher.apply, teacher_params, dataset, steps=100)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxshrink.distill.objective import DistillLoss
from jaxshrink.distill.step import distill_step
from jaxshrink.errors import InvalidValueError


def batch_indices(num_examples: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
  """`(steps, batch)` int32 indices: consecutive slices of fresh permutations."""
  rng = np.random.default_rng(seed)
  epochs = math.ceil(steps * batch_size / num_examples)
  flat = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])
  return flat[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def transfer_subset(dataset: Any, size: int | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """`(x, y)`: the training split, or a seeded subset of `size` examples of it."""
  x, y = dataset.x_train, dataset.y_train
  if size is None:
    return x, y
  if not isinstance(size, int) or not 1 <= size <= x.shape[0]:
    raise InvalidValueError(
      f"`transfer_size` must be an int in [1, {x.shape[0]}] (the training split); got {size!r}."
    )
  chosen = np.sort(np.random.default_rng(seed).permutation(x.shape[0])[:size])
  return x[chosen], y[chosen]


def student_optimizer(learning_rate: float, steps: int) -> optax.GradientTransformation:
  """Adam with cosine decay to 5% of the peak, after global-norm clipping."""
  schedule = optax.cosine_decay_schedule(learning_rate, max(steps, 1), alpha=0.05)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def distill(
  student: Any,
  teacher_apply: Callable[[Any, Any], Any],
  teacher_params: Any,
  dataset: Any,
  *,
  loss: DistillLoss | None = None,
  steps: int | None = None,
  learning_rate: float | None = None,
  batch_size: int | None = None,
  key: jax.Array | None = None,
  student_params: Any = None,
  optimizer: optax.GradientTransformation | None = None,
  transfer_size: int | None = None,
  augment: Callable | None | str = "model",
) -> Any:
  """Trains `student` to match the teacher on `dataset`'s training split.

  Args:
    student: a `ZooModel` (its `init`, `apply`, defaults for steps/lr/batch and `augment`).
    teacher_apply: the teacher's `(params, x) -> logits` (any architecture).
    teacher_params: its params; dense or compressed (decoded inside the step).
    dataset: a `jaxshrink.data.Dataset`; labels feed the hard term.
    loss: the objective (default `DistillLoss()`).
    steps, learning_rate, batch_size: default to the student's recipe.
    key: PRNG key for init, batch order, projections and augmentation.
    student_params: start from these instead of `student.init`.
    optimizer: replaces the default clipped Adam + cosine schedule (e.g. a pruning wrapper).
    transfer_size: train on a seeded subset of this many training examples.
    augment: `"model"` uses the student's own augmentation, None disables it, or a
      `(key, x) -> x` function.

  Returns:
    The trained student params.
  """
  steps = student.train_steps if steps is None else steps
  if not isinstance(steps, int) or steps < 1:
    raise InvalidValueError(f"`steps` must be a positive int; got {steps!r}.")
  learning_rate = student.learning_rate if learning_rate is None else learning_rate
  if learning_rate <= 0:
    raise InvalidValueError(f"`learning_rate` must be > 0; got {learning_rate!r}.")
  batch_size = student.batch_size if batch_size is None else batch_size
  if not isinstance(batch_size, int) or batch_size < 1:
    raise InvalidValueError(f"`batch_size` must be a positive int; got {batch_size!r}.")
  augment = student.augment if augment == "model" else augment
  key = jax.random.key(0) if key is None else key
  init_key, data_key, loss_key, aug_key = jax.random.split(key, 4)
  seed = int(jax.random.randint(data_key, (), 0, np.iinfo(np.int32).max))
  x_np, y_np = transfer_subset(dataset, transfer_size, seed)
  params = student.init(init_key) if student_params is None else student_params
  optimizer = student_optimizer(learning_rate, steps) if optimizer is None else optimizer
  builder = distill_step(student.apply, teacher_apply, optimizer, loss, augment=augment)
  x_all, y_all = jnp.asarray(x_np), jnp.asarray(y_np)
  state = builder.init(params, teacher_params, x_all[:1], key=loss_key)
  gather = jax.jit(lambda x, y, i: (x[i], y[i]))
  for index in batch_indices(x_np.shape[0], steps, batch_size, seed):
    x, y = gather(x_all, y_all, index)
    state, _ = builder.step(state, teacher_params, x, y, key=aug_key)
  return state.params
