"""Fine-tuning a compressed tree: trains the low-rank factors (and other float leaves).

A `LowRank` encoding is a pytree whose children are its factors, so gradients
of the loss through `materialize` reach `a` and `b` directly, and optax
updates them in place of the dense kernel. Integer leaves (quantized codes)
stay frozen; quantize the factors after fine-tuning.

>>> ctree = finetune(model.apply, factorize(params, ".*kernel", rank=8), dataset, steps=200)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxshrink.encoding import materialize
from jaxshrink.errors import InvalidValueError


def _is_float(leaf: Any) -> bool:
  return jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating)


def finetune(
  apply_fn: Callable[[Any, Any], Any],
  tree: Any,
  dataset: Any,
  *,
  steps: int,
  learning_rate: float = 1e-3,
  batch_size: int = 64,
  key: jax.Array | None = None,
  augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
  loss_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> Any:
  """Trains every float leaf of a (compressed) tree on `dataset`'s training split.

  Args:
    apply_fn: the model's pure `(params, x) -> logits` over dense params.
    tree: the tree to train, e.g. from `factorize`; its structure is kept.
    dataset: supplies `x_train`, `y_train`.
    steps: optimizer steps (>= 1).
    learning_rate: Adam peak rate, cosine-decayed to 5%.
    batch_size: examples per step.
    key: PRNG key for the batch order and augmentation.
    augment: optional `(key, x) -> x` inside the step.
    loss_fn: `(logits, labels) -> ()`, default `models.task_loss` (cross-entropy for labels,
      cosine distance for embedding targets).

  Returns:
    The tree with trained factors and float leaves.
  """
  from jaxshrink.distill.train import batch_indices
  from jaxshrink.models import task_loss

  if not isinstance(steps, int) or steps < 1:
    raise InvalidValueError(f"fine-tuning `steps` must be a positive int; got {steps!r}.")
  if not learning_rate > 0:
    raise InvalidValueError(f"`learning_rate` must be > 0; got {learning_rate!r}.")
  loss_fn = task_loss if loss_fn is None else loss_fn
  key = jax.random.key(0) if key is None else key
  data_key, aug_key = jax.random.split(key)
  leaves, treedef = jax.tree.flatten(tree)
  trainable = [_is_float(leaf) for leaf in leaves]
  frozen = [None if t else leaf for leaf, t in zip(leaves, trainable, strict=True)]

  def merge(train_leaves):
    it = iter(train_leaves)
    pairs = zip(trainable, frozen, strict=True)
    return jax.tree.unflatten(treedef, [next(it) if t else f for t, f in pairs])

  optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.05))
  params = [leaf for leaf, t in zip(leaves, trainable, strict=True) if t]
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, x_all, y_all, index, count):
    x, y = x_all[index], y_all[index]
    if augment is not None:
      x = augment(jax.random.fold_in(aug_key, count), x)

    def loss(p):
      return loss_fn(apply_fn(materialize(merge(p)), x), y)

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  seed = int(jax.random.randint(data_key, (), 0, np.iinfo(np.int32).max))
  x_all, y_all = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
  for count, index in enumerate(batch_indices(dataset.num_train, steps, batch_size, seed)):
    params, opt_state, _ = step(params, opt_state, x_all, y_all, index, np.int32(count))
  return merge(params)
