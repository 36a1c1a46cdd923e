"""The teacher-student step: exactness vs a hand-written step, linen + nnx, compressed
teachers, learned projections, composition with other optax transforms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxshrink.cast import cast_params
from jaxshrink.distill import (
  DistillLoss,
  FeaturePair,
  distill_step,
  functional,
  kd_loss,
)
from jaxshrink.encoding import materialize
from jaxshrink.sparsity import wrapper
from jaxshrink.tree import flatten


class MLP(nn.Module):
  hidden: int
  out: int = 5
  features: bool = False

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
    logits = nn.Dense(self.out, name="fc2")(h)
    return {"logits": logits, "hidden": h} if self.features else logits


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(6, 4, rngs=rngs)
    self.fc2 = nnx.Linear(4, 5, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


X = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
Y = np.random.default_rng(1).integers(0, 5, size=(8,)).astype(np.int32)


@pytest.fixture(scope="module")
def models_and_params():
  teacher, student = MLP(32), MLP(4)
  tp = teacher.init(jax.random.key(0), X)["params"]
  sp = student.init(jax.random.key(1), X)["params"]
  return teacher, tp, student, sp


def test_one_step_equals_hand_written_sgd(models_and_params):
  teacher, tp, student, sp = models_and_params
  t_apply, _ = functional(teacher)
  s_apply, _ = functional(student)
  loss = DistillLoss(temperature=3.0, alpha=0.7)
  step = distill_step(s_apply, t_apply, optax.sgd(0.1), loss, donate=False)
  state = step.init(sp, tp, X, key=jax.random.key(2))
  new, metrics = step.step(state, tp, X, Y)

  def reference(p):
    return kd_loss(s_apply(p, X), t_apply(tp, X), Y, temperature=3.0, alpha=0.7)

  value, grads = jax.value_and_grad(reference)(sp)
  np.testing.assert_allclose(metrics["loss"], value, rtol=1e-6)
  want = jax.tree.map(lambda p, g: p - 0.1 * g, sp, grads)
  for got, exp in zip(jax.tree.leaves(new.params), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-7)
  assert int(new.step) == 1


def test_compressed_teacher_is_decoded_inside_the_step(models_and_params):
  teacher, tp, student, sp = models_and_params
  ctp = cast_params(tp, ".*kernel", dtype="bfloat16")
  step = distill_step(functional(student)[0], functional(teacher)[0], optax.adam(1e-2),
                      donate=False)  # fmt: skip
  state = step.init(sp, ctp, X, key=jax.random.key(0))
  a, _ = step.step(state, ctp, X, Y)
  b, _ = step.step(state, materialize(ctp), X, Y)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6)


def test_teacher_gets_no_gradient(models_and_params):
  teacher, tp, student, sp = models_and_params
  s_apply, t_apply = functional(student)[0], functional(teacher)[0]
  step = distill_step(s_apply, t_apply, optax.sgd(0.1), donate=False)
  state = step.init(sp, tp, X, key=jax.random.key(0))

  def total(tp):
    return step.step(state, tp, X, Y)[1]["loss"]

  grads = jax.grad(total)(tp)  # only through stop_gradient: exactly zero
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


def test_nnx_student_trains_and_updates_back():
  teacher = MLP(32)
  tp = teacher.init(jax.random.key(0), X)["params"]
  module = NNXMLP(nnx.Rngs(3))
  apply, params = functional(module)
  step = distill_step(apply, functional(teacher)[0], optax.adam(3e-2), DistillLoss(alpha=1.0))
  state = step.init(params, tp, X, key=jax.random.key(0))
  losses = []
  for _ in range(30):
    state, metrics = step.step(state, tp, X)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0]
  nnx.update(module, state.params)
  np.testing.assert_allclose(module(X), apply(state.params, X), rtol=1e-6)


def test_feature_pair_trains_projection(models_and_params):
  teacher, student = MLP(32, features=True), MLP(4, features=True)
  tp = teacher.init(jax.random.key(0), X)["params"]
  sp = student.init(jax.random.key(1), X)["params"]
  pair = FeaturePair("hidden", "hidden", kind="mse", weight=0.5)
  loss = DistillLoss(pairs=(pair,), logit_mse=0.1, logit_cosine=0.1)
  step = distill_step(functional(student)[0], functional(teacher)[0], optax.adam(1e-2), loss)
  state = step.init(sp, tp, X, key=jax.random.key(0))
  assert state.loss_params[pair.name]["kernel"].shape == (4, 32)
  before = np.asarray(state.loss_params[pair.name]["kernel"]).copy()
  state, metrics = step.step(state, tp, X, Y)
  assert set(metrics) == {"loss", "kd", "logit_mse", "logit_cosine", pair.name}
  assert not np.allclose(state.loss_params[pair.name]["kernel"], before)


def test_token_model_with_padding_mask():
  t_logits = jax.random.normal(jax.random.key(0), (2, 5, 7))

  def teacher(p, x):
    return t_logits * p

  def student(p, x):
    return p["w"] * jnp.ones((2, 5, 7)) + p["b"]

  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  step = distill_step(student, teacher, optax.sgd(0.0), DistillLoss(alpha=1.0), donate=False)
  params = {"w": jnp.ones((7,)), "b": jnp.zeros((7,))}
  state = step.init(params, 1.0, None, key=jax.random.key(0))
  _, full = step.step(state, 1.0, None, mask=mask)
  poisoned = t_logits.at[0, 3:].set(1e4)
  step2 = distill_step(student, lambda p, x: poisoned, optax.sgd(0.0), DistillLoss(alpha=1.0))
  _, masked = step2.step(step2.init(params, 1.0, None, key=jax.random.key(0)), 1.0, None,
                         mask=mask)  # fmt: skip
  np.testing.assert_allclose(full["loss"], masked["loss"], rtol=1e-6)


def test_composes_with_the_pruning_wrapper(models_and_params):
  from jaxshrink.sparsity.allocation import Pruner

  teacher, tp, student, sp = models_and_params
  tx = wrapper.pruning(optax.adam(1e-2), Pruner(".*fc1/kernel", sparsity=0.5))
  step = distill_step(functional(student)[0], functional(teacher)[0], tx)
  state = step.init(sp, tp, X, key=jax.random.key(0))
  for _ in range(3):
    state, _ = step.step(state, tp, X, Y)
  kernel = np.asarray(state.params["fc1"]["kernel"])
  assert np.sum(kernel == 0) == kernel.size // 2


def test_bad_step_arguments(models_and_params):
  teacher, tp, student, sp = models_and_params
  with pytest.raises(TypeError, match="optax.GradientTransformation"):
    distill_step(functional(student)[0], functional(teacher)[0], "adam")
  with pytest.raises(TypeError, match="DistillLoss"):
    distill_step(functional(student)[0], functional(teacher)[0], optax.sgd(1.0), loss="kd")
  wide = MLP(4, out=7)
  step = distill_step(functional(wide)[0], functional(teacher)[0], optax.sgd(1.0))
  with pytest.raises(ValueError, match=r"same shape; got student \(8, 7\) and teacher \(8, 5\)"):
    step.init(wide.init(jax.random.key(0), X)["params"], tp, X, key=jax.random.key(0))
  with pytest.raises(TypeError, match="apply"):
    functional(3)


def test_distills_into_a_pruned_and_quantized_student_in_one_loop(models_and_params):
  from jaxshrink.quant import LayerQuant, QArray, QuantSpec, qat_apply, quantize_params
  from jaxshrink.sparsity import Pruner, pruning

  teacher, tp, student, _ = models_and_params
  sp = student.init(jax.random.key(1), X)["params"]
  spec = QuantSpec(bits=8)
  qat_student = qat_apply(functional(student)[0], ".*kernel", LayerQuant(spec, activation_bits=8))
  tx = pruning(optax.adam(1e-2), Pruner(".*fc1/kernel", sparsity=0.5))
  step = distill_step(qat_student, functional(teacher)[0], tx, DistillLoss(temperature=2.0))
  state = step.init(sp, tp, X, key=jax.random.key(0))
  losses = []
  for _ in range(20):
    state, metrics = step.step(state, tp, X, Y)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  kernel = np.asarray(state.params["fc1"]["kernel"])
  assert np.sum(kernel == 0) == kernel.size // 2  # the mask survived QAT updates
  ctree = quantize_params(state.params, ".*kernel", spec)
  assert isinstance(ctree["fc1"]["kernel"], QArray)
  # Pruned weights stay exactly zero through int8 conversion.
  np.testing.assert_array_equal(np.asarray(ctree["fc1"]["kernel"].materialize()) == 0, kernel == 0)


def test_default_step_never_deletes_the_callers_arrays(models_and_params):
  teacher, tp, student, sp = models_and_params
  before = jax.tree.map(np.array, sp)
  # An optimizer whose state holds the params themselves: one buffer must not be donated twice.
  anchor = optax.GradientTransformation(lambda p: {"anchor": p}, lambda u, s, p=None: (u, s))
  for tx in (optax.adam(1e-2), optax.chain(optax.sgd(0.1), anchor)):
    step = distill_step(functional(student)[0], functional(teacher)[0], tx)  # default donate
    state = step.init(sp, tp, X, key=jax.random.key(0))
    for _ in range(4):
      state, _ = step.step(state, tp, X, Y)
    for path, leaf in flatten(sp).items():
      assert not leaf.is_deleted(), path
      np.testing.assert_array_equal(np.asarray(leaf), flatten(before)[path])
    # The steps trained the state's own copy (donated in place), not the caller's arrays.
    moved = np.abs(np.asarray(state.params["fc1"]["kernel"]) - before["fc1"]["kernel"]).max()
    assert moved > 1e-3
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))
  teacher_leaves = jax.tree.leaves(tp)
  assert not any(leaf.is_deleted() for leaf in teacher_leaves)
