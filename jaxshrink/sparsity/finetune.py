"""A small jitted fine-tuning loop for the recipe stage: the user's model, any optax wrapper.

It is what a user writes anyway; the pruning wrapper adds nothing to it beyond
wrapping the optimizer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxshrink.models import task_loss


def finetune_optimizer(learning_rate: float, steps: int) -> optax.GradientTransformation:
  """Clipped Adam with cosine decay to 5%: the inner optimizer the stage wraps."""
  schedule = optax.cosine_decay_schedule(learning_rate, max(steps, 1), alpha=0.05)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def finetune(
  model: Any,
  params: Any,
  dataset: Any,
  tx: optax.GradientTransformation,
  *,
  steps: int,
  key: jax.Array,
  batch_size: int | None = None,
) -> tuple[Any, Any]:
  """Trains `params` for `steps` on `dataset`'s train split with `tx`; returns `(params, state)`."""
  batch_size = batch_size or model.batch_size
  x_all, y_all = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
  augment = model.augment

  def loss_fn(p, x, y):
    return task_loss(model.apply(p, x), y)  # cross-entropy, or cosine for embedding targets

  @jax.jit
  def step(p, state, index, k):
    x, y = x_all[index], y_all[index]
    if augment is not None:
      x = augment(k, x)
    grads = jax.grad(loss_fn)(p, x, y)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  data_key, aug_key = jax.random.split(key)
  seed = int(jax.random.randint(data_key, (), 0, np.iinfo(np.int32).max))
  rng = np.random.default_rng(seed)
  n = x_all.shape[0]
  order = np.concatenate([rng.permutation(n) for _ in range(steps * batch_size // n + 1)])
  state = tx.init(params)
  for i in range(steps):
    index = order[i * batch_size : (i + 1) * batch_size].astype(np.int32)
    params, state = step(params, state, index, jax.random.fold_in(aug_key, i))
  return params, state
