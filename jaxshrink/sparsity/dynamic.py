"""Dynamic sparse training: the mask moves while the sparsity stays fixed.

At every scheduled update, each layer drops the `k` active weights of lowest
magnitude and regrows `k` inactive ones, with `k` a cosine-decayed fraction of
its active weights (`drop_fraction * (1 + cos(pi * t / T)) / 2`):

- SET regrows at random (Mocanu et al., "Scalable training of artificial
  neural networks with adaptive sparse connectivity", 2018);
- RigL regrows where the dense gradient is largest (Evci et al., "Rigging the
  Lottery: Making All Tickets Winners", 2020).

Regrown weights start at zero and the wrapper resets their optimizer state.
The masks start at the final sparsity (ERK by default, as in RigL).

>>> tx = rigl(optax.adam(1e-3), Pruner(".*kernel", 0.9, allocation="erk"), params,
...           constant_schedule(begin=0, end=600, frequency=50))
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxshrink.errors import InvalidValueError
from jaxshrink.sparsity.allocation import Pruner
from jaxshrink.sparsity.schedules import Schedule, constant_schedule
from jaxshrink.sparsity.structures import Unstructured, keep_top
from jaxshrink.sparsity.wrapper import pruning
from jaxshrink.tree import flatten, map_with_path

DYNAMIC_METHODS = ("rigl", "set")


def cosine_drop_fraction(step: Any, drop_fraction: float, begin: int, end: int) -> jax.Array:
  """`drop_fraction * (1 + cos(pi * (step - begin) / (end - begin))) / 2`, float32."""
  span = max(end - begin, 1)
  t = jnp.clip(jnp.asarray(step, jnp.float32) - begin, 0.0, span) / span
  return (drop_fraction * 0.5 * (1.0 + jnp.cos(math.pi * t))).astype(jnp.float32)


def drop_and_grow(
  w: jax.Array, mask: jax.Array, grow_score: jax.Array, fraction: jax.Array
) -> jax.Array:
  """One layer's update: drop the `k` smallest active |w|, grow the `k` best inactive.

  Only weights inactive before the update can grow, so a weight never flips twice
  in one step. The number of active weights is unchanged.
  """
  flat_mask = mask.ravel()
  active = jnp.sum(flat_mask.astype(jnp.int32))
  inactive = flat_mask.size - active
  k = jnp.minimum(jnp.floor(fraction * active).astype(jnp.int32), inactive)
  # Drop: rank active weights by smallest |w|; inactive ones never drop.
  drop_score = jnp.where(flat_mask, -jnp.abs(w.ravel()).astype(jnp.float32), -jnp.inf)
  dropped = keep_top(drop_score, k)
  grow = keep_top(jnp.where(flat_mask, -jnp.inf, grow_score.ravel()), k) & ~flat_mask
  return ((flat_mask & ~dropped) | grow).reshape(mask.shape)


def dynamic_sparse(
  method: str,
  inner: optax.GradientTransformation,
  pruner: Pruner,
  params: Any,
  schedule: Schedule | None = None,
  *,
  drop_fraction: float = 0.3,
  seed: int = 0,
  masks: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """A `pruning` wrapper whose masks evolve by SET or RigL.

  Args:
    method: `rigl` or `set`.
    inner: the user's optimizer.
    pruner: rule, final sparsity, allocation (unstructured only), criterion for the start mask.
    params: the params training starts from; the start masks are ranked on them.
    schedule: when to drop and grow; default every 100 steps for 1000 steps.
    drop_fraction: the share of active weights replaced at the first update.
    seed: seed of the random start mask and of SET's regrowth.
    masks: start masks instead of ranking `params`.
  """
  if method not in DYNAMIC_METHODS:
    raise InvalidValueError(
      f"Unknown dynamic method {method!r}; expected one of {list(DYNAMIC_METHODS)}."
    )
  if not isinstance(pruner.structure, Unstructured):
    raise InvalidValueError(
      f"{method} moves single weights: it needs structure 'unstructured'; got "
      f"{pruner.structure.name!r}."
    )
  if not 0.0 <= drop_fraction <= 1.0:
    raise InvalidValueError(f"`drop_fraction` must be in [0, 1]; got {drop_fraction}.")
  schedule = schedule or constant_schedule(begin=0, end=1000, frequency=100)
  end = schedule.last if schedule.last is not None else schedule.begin + 1000
  if masks is None:
    masks = pruner.masks(params, 1.0, key=jax.random.key(seed))
  selected = {u.name for u in pruner.units(params)[0]}

  def update(params, grads, masks, step, key):
    fraction = cosine_drop_fraction(step, drop_fraction, schedule.begin, end)
    flat_p, flat_g, flat_m = flatten(params), flatten(grads), flatten(masks)
    key = jax.random.wrap_key_data(key)
    new = {}
    for index, path in enumerate(sorted(selected)):
      if method == "rigl":
        score = jnp.abs(flat_g[path]).astype(jnp.float32)
      else:
        score = jax.random.uniform(jax.random.fold_in(key, index), flat_p[path].shape)
      new[path] = drop_and_grow(flat_p[path], flat_m[path], score, fraction)
    return map_with_path(lambda path, m: new.get(path, m), masks)

  return pruning(inner, pruner, schedule, masks=masks, mask_update=update, seed=seed)


def rigl(inner, pruner, params, schedule=None, **kwargs) -> optax.GradientTransformationExtraArgs:
  """RigL: drop by magnitude, regrow by dense-gradient magnitude. See `dynamic_sparse`."""
  return dynamic_sparse("rigl", inner, pruner, params, schedule, **kwargs)


def set_training(inner, pruner, params, schedule=None, **kwargs):
  """SET: drop by magnitude, regrow at random. See `dynamic_sparse`."""
  return dynamic_sparse("set", inner, pruner, params, schedule, **kwargs)
