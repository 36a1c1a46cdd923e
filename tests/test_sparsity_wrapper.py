"""The optax wrapper over hundreds of steps: exact zeros, scheduled masks, zero moments, NNX,
RigL/SET and sparsity-preserving QAT."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxshrink.errors import JaxshrinkError
from jaxshrink.sparsity import (
  PruneMask,
  Pruner,
  PruneState,
  apply_masks,
  check_pruned,
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
  check_pruned(nnx.state(model, nnx.Param), optimizer.opt_state)  # nnx.State params check too


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
  from jaxshrink.sparsity import oneshot_prune, pruned_masks

  pruned = oneshot_prune(_init(), Pruner(".*kernel", 0.5))
  masks = pruned_masks(pruned, Pruner(".*kernel", 0.5))
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


OUTERMOST = r"Make `pruning\(\.\.\.\)` the outermost transform: wrap the chain, not a link of it"


def _leaked(state):
  return {p: int(n) for p, n in flatten(state.leaked).items()}


def test_weight_decay_and_clipping_inside_the_wrapped_chain_keep_exact_zeros():
  inner = optax.chain(
    optax.clip_by_global_norm(0.5), optax.add_decayed_weights(1e-2), optax.adam(1e-2)
  )
  schedule = polynomial_schedule(begin=0, end=100, frequency=10)
  tx = pruning(inner, Pruner(".*kernel", 0.75), schedule)
  record = tuple(range(5, 160, 7))
  params, state, seen = _train(tx, 160, record=record)
  for step, (p, masks, st) in seen.items():
    for path, mask in flatten(masks).items():
      if mask.ndim:
        w = np.asarray(flatten(p)[path])
        assert (w[~np.asarray(mask)] == 0.0).all(), (step, path)
    assert set(_leaked(st).values()) == {0}, step
  kernel = masks_of(state)["fc1"]["kernel"]
  assert int((~kernel).sum()) == round(0.75 * kernel.size)
  check_pruned(params, state)  # no error


@pytest.mark.parametrize(
  "after", [optax.add_decayed_weights(1e-2), optax.clip_by_global_norm(1e-3)], ids=["wd", "clip"]
)
def test_a_transform_after_the_wrapper_is_detected(after):
  pruner = Pruner(".*kernel", 0.5)
  tx = optax.chain(pruning(optax.sgd(0.1), pruner), after)  # the misuse
  params, state, _ = _train(tx, 20)
  w = np.asarray(params["fc1"]["kernel"])
  mask = np.asarray(masks_of(state)["fc1"]["kernel"])
  assert (w[~mask] != 0).any()  # what the check is for: pruned weights drifted
  leaked = _leaked(state[0])
  assert leaked["fc1/kernel"] > 0 and leaked["fc2/kernel"] > 0
  assert leaked["fc1/bias"] == leaked["fc2/bias"] == 0  # never pruned
  with pytest.raises(JaxshrinkError, match=r"pruned weight\(s\) of `fc1/kernel` are non-zero"):
    check_pruned(params, state)
  with pytest.raises(JaxshrinkError, match=OUTERMOST):
    check_pruned(params, state)
  # Zeroing the params afterwards hides nothing: the state remembers the leak.
  with pytest.raises(JaxshrinkError, match="in the params given to an earlier update"):
    check_pruned(apply_masks(params, masks_of(state)), state)


def test_misuse_raises_at_the_next_eager_update():
  params = _init()
  tx = optax.chain(pruning(optax.sgd(0.1), Pruner(".*kernel", 0.5)), optax.add_decayed_weights(0.1))
  state = tx.init(params)
  grads = jax.grad(_loss)(params, X, Y)
  updates, state = tx.update(grads, state, params)  # step 0 prunes: updates are -w (+ decay)
  params = optax.apply_updates(params, updates)
  with pytest.raises(JaxshrinkError, match=r"`fc1/kernel` are non-zero in the params given to "
                     r"update at step 1"):  # fmt: skip
    tx.update(jax.grad(_loss)(params, X, Y), state, params)


def test_given_masks_may_be_unapplied_at_step_zero():
  params = _init()
  pruner = Pruner(".*kernel", 0.5)
  masks = pruner.masks(params)
  tx = pruning(optax.sgd(0.1), pruner, masks=masks)
  state = tx.init(params)  # dense params, masks not applied yet: not a leak
  updates, state = tx.update(jax.grad(_loss)(params, X, Y), state, params)
  params = optax.apply_updates(params, updates)
  updates, state = tx.update(jax.grad(_loss)(params, X, Y), state, params)
  assert set(_leaked(state).values()) == {0}
  check_pruned(optax.apply_updates(params, updates), state)
