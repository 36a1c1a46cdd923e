"""The optax wrapper over hundreds of steps: exact zeros, scheduled masks, zero moments, NNX,
RigL/SET and sparsity-preserving QAT."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxshrink.sparsity import (
  PruneMask,
  Pruner,
  PruneState,
  drop_and_grow,
  masks_of,
  polynomial_schedule,
  pruning,
  rigl,
  set_training,
  tag_masks,
)
from jaxshrink.sparsity.dynamic import cosine_drop_fraction
from jaxshrink.sparsity.schedules import constant_schedule
from jaxshrink.tree import flatten

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(256, 16)).astype(np.float32))
Y = (X[:, :4].sum(axis=1) > 0).astype(jnp.int32)


def _init():
  rng = np.random.default_rng(1)
  return {
    "fc1": {
      "kernel": 0.3 * rng.normal(size=(16, 32)).astype(np.float32),
      "bias": np.zeros(32, np.float32),
    },
    "fc2": {
      "kernel": 0.3 * rng.normal(size=(32, 2)).astype(np.float32),
      "bias": np.zeros(2, np.float32),
    },
  }


def _apply(p, x):
  h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def _loss(p, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(_apply(p, x), y).mean()


def _train(tx, steps, params=None, record=()):
  params = _init() if params is None else params
  state = tx.init(params)

  @jax.jit
  def step(p, s, i):
    idx = (jnp.arange(32) + 32 * i) % 256
    g = jax.grad(_loss)(p, X[idx], Y[idx])
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  seen = {}
  for i in range(steps):
    params, state = step(params, state, i)
    if i in record:
      seen[i] = (params, masks_of(state), state)
  return params, state, seen


@pytest.fixture(scope="module")
def gradual_run():
  schedule = polynomial_schedule(begin=20, end=220, frequency=20)
  tx = pruning(optax.adam(1e-2), Pruner(".*kernel", 0.8), schedule)
  return _train(tx, 300, record=(10, 40, 45, 59, 60, 150, 299))


def test_pruned_weights_exactly_zero_every_recorded_step(gradual_run):
  _, _, seen = gradual_run
  for step, (params, masks, _) in seen.items():
    for path, mask in flatten(masks).items():
      if mask.ndim:
        w = np.asarray(flatten(params)[path])
        assert (w[~np.asarray(mask)] == 0.0).all(), (step, path)
  assert all(bool(m.all()) for m in jax.tree.leaves(seen[10][1]))  # before `begin`: dense


def test_masks_follow_the_schedule_inside_jit(gradual_run):
  params, state, seen = gradual_run
  sched = polynomial_schedule(begin=20, end=220, frequency=20)
  for step in (45, 59, 150, 299):
    masks = seen[step][1]
    expected = float(sched.fraction(step)) * 0.8
    k = masks["fc1"]["kernel"]
    assert int((~k).sum()) == round(expected * k.size), step
  # No update between 40 and 59: the same mask.
  np.testing.assert_array_equal(seen[45][1]["fc1"]["kernel"], seen[59][1]["fc1"]["kernel"])
  assert not np.array_equal(seen[59][1]["fc1"]["kernel"], seen[60][1]["fc1"]["kernel"])
  final = masks_of(state)
  assert int((~final["fc2"]["kernel"]).sum()) == round(0.8 * 64)
  assert final["fc1"]["bias"].shape == () and final["fc1"]["kernel"].dtype == jnp.bool_
  assert _loss(params, X, Y) < 0.3  # it still learns


def test_inner_moments_of_pruned_weights_stay_zero(gradual_run):
  _, state, seen = gradual_run
  for _, masks, st in [*seen.values(), (None, masks_of(state), state)]:
    adam = st.inner_state[0]
    for moment in (adam.mu, adam.nu):
      for mask, value in zip(jax.tree.leaves(masks), jax.tree.leaves(moment), strict=True):
        assert (np.asarray(value)[~np.broadcast_to(np.asarray(mask), value.shape)] == 0).all()


def test_wrapper_needs_params():
  tx = pruning(optax.sgd(0.1), Pruner(".*kernel", 0.5))
  state = tx.init(_init())
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(_init(), state)


def test_nnx_optimizer_with_prune_mask_variables():
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(16, 32, rngs=rngs)
      self.fc2 = nnx.Linear(32, 2, rngs=rngs)

    def __call__(self, x):
      return self.fc2(jnp.tanh(self.fc1(x)))

  model = MLP(nnx.Rngs(0))
  tx = pruning(optax.adam(1e-2), Pruner(".*kernel", 0.75), polynomial_schedule(0, 50, 10))
  optimizer = tag_masks(nnx.Optimizer(model, tx, wrt=nnx.Param))

  @nnx.jit
  def step(model, optimizer, x, y):
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    optimizer.update(model, nnx.grad(loss)(model))

  for i in range(100):
    idx = (np.arange(32) + 32 * i) % 256
    step(model, optimizer, X[idx], Y[idx])
  mask_vars = nnx.state(optimizer, PruneMask)
  assert len(jax.tree.leaves(mask_vars)) == 4
  kernel = np.asarray(model.fc1.kernel[...])
  mask = np.asarray(masks_of(optimizer.opt_state)["fc1"]["kernel"])
  assert abs((~mask).mean() - 0.75) < 1e-6
  assert (kernel[~mask] == 0).all() and (kernel[mask] != 0).all()
  assert nnx.state(model, PruneMask) == nnx.State({})  # Param-only model: masks never trained


def test_drop_and_grow_keeps_count_and_resets_regrown_state():
  w = jnp.array([0.0, 3.0, -0.1, 2.0, 0.0, 0.5, 0.0, 0.0])
  mask = w != 0
  grow = jnp.array([9.0, 0.0, 0.0, 0.0, 1.0, 0.0, 5.0, 0.0])
  new = drop_and_grow(w, mask, grow, jnp.float32(0.5))
  assert new.tolist() == [True, True, False, True, False, False, True, False]
  assert float(cosine_drop_fraction(0, 0.3, 0, 100)) == pytest.approx(0.3)
  assert float(cosine_drop_fraction(50, 0.3, 0, 100)) == pytest.approx(0.15)
  assert float(cosine_drop_fraction(100, 0.3, 0, 100)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_dynamic_sparse_training(method):
  params = _init()
  pruner = Pruner(".*kernel", 0.8, allocation="erk")
  fn = rigl if method == "rigl" else set_training
  tx = fn(optax.adam(1e-2), pruner, params, constant_schedule(0, 100, 25), drop_fraction=0.3)
  start = masks_of(tx.init(params))
  out, state, seen = _train(tx, 150, params=params, record=(49, 50))
  before, after = seen[49][1], seen[50][1]
  for path in ("fc1/kernel", "fc2/kernel"):
    b, a = np.asarray(flatten(before)[path]), np.asarray(flatten(after)[path])
    assert b.sum() == a.sum() == np.asarray(flatten(start)[path]).sum()
    assert (a != b).any()  # connections moved
    grown = a & ~b
    adam = seen[50][2].inner_state[0]
    mu = np.asarray(flatten(adam.mu)[path])
    g_step = jax.grad(_loss)(
      seen[49][0], X[(np.arange(32) + 32 * 50) % 256], Y[(np.arange(32) + 32 * 50) % 256]
    )
    g = np.asarray(flatten(g_step)[path])
    # Regrown weights start from fresh moments: mu = (1 - b1) * g after one step.
    np.testing.assert_allclose(mu[grown], 0.1 * g[grown], rtol=1e-4, atol=1e-7)
    w = np.asarray(flatten(out)[path])
    assert (w[~np.asarray(flatten(masks_of(state))[path])] == 0).all()
  assert _loss(out, X, Y) < 0.4


def test_sparsity_preserving_qat_keeps_mask_exactly():
  from jaxshrink.quant import QuantSpec
  from jaxshrink.quant.qat import qat_apply
  from jaxshrink.sparsity import oneshot_prune

  pruned, masks = oneshot_prune(_init(), Pruner(".*kernel", 0.5))
  qapply = qat_apply(_apply, ".*kernel", QuantSpec(bits=4))
  tx = pruning(optax.adam(1e-2), Pruner(".*kernel", 0.5), masks=masks)  # fixed masks
  state = tx.init(pruned)

  @jax.jit
  def step(p, s):
    g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(qapply(p, X), Y).mean())(
      p
    )
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  params = pruned
  for _ in range(100):
    params, state = step(params, state)
  for path in ("fc1/kernel", "fc2/kernel"):
    w = np.asarray(flatten(params)[path])
    np.testing.assert_array_equal(w != 0, np.asarray(flatten(masks)[path]))
  assert isinstance(state, PruneState)
