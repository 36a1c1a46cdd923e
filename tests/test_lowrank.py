"""Low-rank factorization: SVD exactness, rank selection, factored execution, int8 factors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxshrink import export
from jaxshrink.capture import kernel_matrix
from jaxshrink.distill import DistillLoss
from jaxshrink.encoding import materialize
from jaxshrink.errors import NoMatchError
from jaxshrink.lowrank import (
  LowRank,
  LowRankDense,
  LowRankLinear,
  allocate_budget,
  contract_dims_from_model,
  energy_rank,
  factorize,
  factorize_array,
  lowrank_apply,
  plan_ranks,
  quantize_factors,
)
from jaxshrink.models import get_model
from jaxshrink.recover import recover
from jaxshrink.tree import Rule

RNG = np.random.default_rng(0)


def np_truncated(m, r):
  u, s, vt = np.linalg.svd(m.astype(np.float64), full_matrices=False)
  return (u[:, :r] * s[:r]) @ vt[:r]


@pytest.fixture(scope="module")
def cnn():
  model = get_model("digits-cnn")
  return model, model.init(jax.random.key(0))


@pytest.mark.parametrize("shape", [(24, 16), (3, 3, 4, 8), (16, 2, 6)])
@pytest.mark.parametrize("rank", [1, 3])
def test_factors_match_numpy_truncated_svd(shape, rank):
  w = RNG.normal(size=shape).astype(np.float32)
  enc = factorize_array(w, rank)
  k = int(np.prod(shape[:-1]))
  assert enc.matrix_shape == (k, shape[-1]) and enc.a.shape == (k, rank)
  m = np.asarray(kernel_matrix(jnp.asarray(w), enc.contract_dims))
  got = np.asarray(jax.jit(lambda e: e.materialize())(enc))
  np.testing.assert_allclose(kernel_matrix(got, enc.contract_dims), np_truncated(m, rank),
                             rtol=1e-4, atol=1e-5)  # fmt: skip
  # Balanced factors: a and b carry the same singular value norms.
  np.testing.assert_allclose(np.linalg.norm(enc.a, axis=0), np.linalg.norm(enc.b, axis=1),
                             rtol=1e-4)  # fmt: skip


def test_full_rank_reconstructs_and_other_contract_dims():
  w = RNG.normal(size=(16, 2, 6)).astype(np.float32)
  enc = factorize_array(w, 12, contract_dims=(1, 2))  # K = 2*6, N = 16
  assert enc.matrix_shape == (12, 16)
  np.testing.assert_allclose(materialize(enc), w, rtol=1e-4, atol=1e-5)


def test_energy_rank_and_budget_allocation_exact():
  assert energy_rank(np.array([3.0, 1.0, 0.0]), 0.9) == 1
  assert energy_rank(np.array([3.0, 1.0, 0.0]), 0.95) == 2
  assert energy_rank(np.array([3.0, 1.0, 1.0]), 1.0) == 3
  spectra = {"a": np.array([10.0, 9.0, 1.0, 0.5]), "b": np.array([5.0, 0.1, 0.1, 0.1])}
  dims = {"a": (8, 8), "b": (8, 8)}
  assert allocate_budget(spectra, dims, 32) == {"a": 1, "b": 1}
  assert allocate_budget(spectra, dims, 48) == {"a": 2, "b": 1}
  # Never past KN/(K+N) = 4 for an 8x8 kernel, whatever the budget.
  assert allocate_budget(spectra, dims, 10_000) == {"a": 4, "b": 4}


def test_budget_fraction_is_respected(cnn):
  _, params = cnn
  ranks = plan_ranks(params, ".*dense.*kernel", budget=0.5)
  dense = 1024 * 128 + 128 * 10
  cost = ranks["dense1/kernel"] * (1024 + 128) + ranks["dense2/kernel"] * (128 + 10)
  assert cost <= dense // 2 and cost > dense // 2 - (1024 + 128)
  ctree = factorize(params, ".*dense.*kernel", budget=0.5)
  assert ctree["dense1"]["kernel"].rank == ranks["dense1/kernel"]
  assert plan_ranks(params, ".*kernel", energy=1.0)["dense2/kernel"] == 10


@pytest.mark.parametrize("name", ["digits-cnn", "digits-cnn-nnx"])
def test_lowrank_apply_matches_and_drops_flops(name):
  model = get_model(name)
  params = model.init(jax.random.key(0))
  ctree = factorize(params, ".*(conv2|dense1)/kernel", rank=8)
  x = jnp.asarray(RNG.uniform(size=(32, 8, 8, 1)), jnp.float32)
  ref = jax.jit(lambda t, x: model.apply(materialize(t), x))
  fast = jax.jit(lowrank_apply(model.apply))
  np.testing.assert_allclose(fast(ctree, x), ref(ctree, x), rtol=1e-4, atol=1e-5)
  dense_flops = ref.lower(ctree, x).compile().cost_analysis()["flops"]
  fast_flops = fast.lower(ctree, x).compile().cost_analysis()["flops"]
  # conv2 + dense1 dominate; at rank 8 the model needs well under half the flops.
  assert fast_flops < 0.5 * dense_flops


class _BatchNormMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Dense(64)(x)))
    return nn.Dense(10)(x)


def test_lowrank_apply_and_recover_take_a_linen_variable_dict():
  # `params` next to `batch_stats`: the factored kernel is found by its path in the whole tree.
  model = _BatchNormMLP()
  x = jnp.asarray(RNG.normal(size=(64, 32)), jnp.float32)
  variables = model.init(jax.random.key(0), x[:2])
  ctree = {**variables, "params": factorize(variables["params"], ".*Dense_0/kernel", rank=8)}
  ref = model.apply(materialize(ctree), x)
  np.testing.assert_allclose(
    jax.jit(lowrank_apply(model.apply))(ctree, x), ref, rtol=1e-4, atol=1e-5
  )
  loss = DistillLoss(kd=0.0, logit_mse=1.0)
  result = recover(model.apply, ctree, model.apply, variables, np.asarray(x), loss=loss, steps=3)
  assert isinstance(result.tree["params"]["Dense_0"]["kernel"], LowRank)


def test_quantized_factors_and_export_round_trip(cnn, tmp_path):
  model, params = cnn
  ctree = quantize_factors(factorize(params, ".*dense1/kernel", rank=16), 8)
  leaf = ctree["dense1"]["kernel"]
  assert leaf.a.name == "qarray" and leaf.b.name == "qarray"
  assert leaf.nbytes < 16 * (1024 + 128) * 4 / 3.5
  dense = factorize(params, ".*dense1/kernel", rank=16)["dense1"]["kernel"].materialize()
  err = np.abs(np.asarray(leaf.materialize() - dense)).max()
  assert err < 0.05 * np.abs(np.asarray(dense)).max()
  export.save(tmp_path / "ckpt", ctree, model="digits-cnn")
  loaded = export.load(tmp_path / "ckpt")
  got = loaded["dense1"]["kernel"]
  assert isinstance(got, LowRank) and got.contract_dims == (0,)
  np.testing.assert_array_equal(got.a.codes, leaf.a.codes)
  np.testing.assert_array_equal(materialize(got), materialize(leaf))
  x = jnp.zeros((2, 8, 8, 1))
  np.testing.assert_allclose(jax.jit(lowrank_apply(model.apply))(loaded, x),
                             model.apply(materialize(ctree), x), rtol=1e-5, atol=1e-6)  # fmt: skip


def test_contract_dims_from_model(cnn):
  model, params = cnn
  dims = contract_dims_from_model(model.apply, params, jnp.zeros((2, 8, 8, 1)), ".*kernel")
  assert dims == {"conv1/kernel": (0, 1, 2), "conv2/kernel": (0, 1, 2),
                  "dense1/kernel": (0,), "dense2/kernel": (0,)}  # fmt: skip


def test_factorized_layers_linen_and_nnx():
  x = jnp.asarray(RNG.normal(size=(3, 32)), jnp.float32)
  y, variables = LowRankDense(16, rank=4).init_with_output(jax.random.key(0), x)
  p = variables["params"]
  assert p["a"].shape == (32, 4) and p["b"].shape == (4, 16) and y.shape == (3, 16)
  enc = factorize_array(RNG.normal(size=(32, 16)).astype(np.float32), 4)
  bias = jnp.arange(16, dtype=jnp.float32)
  layer = LowRankLinear.from_encoding(enc, bias, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(layer(x), x @ materialize(enc) + bias, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="`rank`=20 must be in"):
    LowRankLinear(32, 16, rank=20, rngs=nnx.Rngs(0))


def test_bad_inputs(cnn):
  _, params = cnn
  with pytest.raises(ValueError, match=r"`rank`=200 exceeds min\(dims\)=128 of `dense1/kernel`"):
    factorize(params, ".*dense1/kernel", rank=200)
  with pytest.raises(ValueError, match=r"exceeds min\(dims\)=9 .*viewed as \(9, 32\)"):
    factorize(params, ".*conv1/kernel", rank=10)
  for energy in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match=r"`energy`.*must be in \(0, 1\]"):
      factorize(params, ".*kernel", energy=energy)
  with pytest.raises(ValueError, match="smaller than the minimum rank-1 cost 1290"):
    factorize(params, ".*dense.*kernel", budget=1000)
  with pytest.raises(ValueError, match=r"fraction.*\(0, 1\]"):
    factorize(params, ".*kernel", budget=1.5)
  with pytest.raises(ValueError, match="exactly one of `rank`, `energy` or `budget`"):
    factorize(params, ".*kernel", rank=2, energy=0.9)
  with pytest.raises(ValueError, match="exactly one"):
    factorize(params, ".*kernel")
  with pytest.raises(ValueError, match="positive int"):
    factorize(params, ".*kernel", rank=0)
  with pytest.raises(NoMatchError, match="min_ndim=1"):  # rules skip vectors by default
    factorize(params, ".*bias", rank=1)
  with pytest.raises(ValueError, match=">= 2 dims"):
    factorize(params, Rule(".*bias", min_ndim=0), rank=1)
  with pytest.raises(TypeError, match="already a lowrank"):
    factorize(factorize(params, ".*dense2/kernel", rank=2), ".*dense2/kernel", rank=2)
  with pytest.raises(ValueError, match="no LowRank leaf"):
    quantize_factors(params)
  with pytest.raises(ValueError, match=r"give a \(3, 5\) matrix"):
    LowRank.from_factors(jnp.ones((3, 2)), jnp.ones((2, 5)), shape=(4, 5))


def test_whitened_factors_fit_the_outputs_on_calibration_inputs():
  # Inputs with a few dominant directions: the weights' own SVD spends rank on directions the
  # inputs barely excite; the whitened one fits X W, within the damping of the optimum.
  x = RNG.normal(size=(512, 24)) * np.geomspace(10.0, 0.01, 24)
  x = x @ np.linalg.qr(RNG.normal(size=(24, 24)))[0]
  w = RNG.normal(size=(24, 16)).astype(np.float32)
  gram = x.T @ x

  def error(enc):
    return np.linalg.norm(x @ (w - np.asarray(materialize(enc), np.float64)))

  q, r = np.linalg.qr(x)
  best = np.linalg.norm(r @ w - np_truncated(r @ w, 4))
  whitened, plain = factorize_array(w, 4, gram=gram), factorize_array(w, 4)
  assert error(whitened) <= 1.02 * best
  assert error(plain) > 2 * error(whitened)
  tree = {"a": {"kernel": w}}
  with pytest.raises(ValueError, match=r"Gram matrix of `a/kernel` has shape \(3, 3\).*\(24, 24\)"):
    factorize(tree, ".*kernel", rank=2, grams={"a/kernel": np.eye(3)})


def test_factorize_stage_method_refusals():
  from jaxshrink.errors import UsageError
  from jaxshrink.lowrank.stage import FACTORIZE_OPTIONS, factorize_stage

  def options(**kw):
    return {**FACTORIZE_OPTIONS, "budget": 0.5, **kw}

  with pytest.raises(UsageError, match=r"`method` of stage `factorize` must be one of"):
    factorize_stage(None, options(method="asvd"))
  with pytest.raises(UsageError, match="`calibration_batches` .* `method: svd` reads no"):
    factorize_stage(None, options(method="svd", calibration_batches=8))
  with pytest.raises(UsageError, match="`calibration_data` of stage `factorize` must be one of"):
    factorize_stage(None, options(calibration_data="test"))


def test_factorize_stage_whitened_fits_held_out_outputs_better_than_plain_svd():
  from jaxshrink.capture import collect, gram_reducer
  from jaxshrink.evaluation import evaluate_tree
  from jaxshrink.recipes import parse_recipe, prepare, run_stages

  def recipe(method):
    stage = {"target": "dense1/kernel", "rank": 8, "method": method}
    return parse_recipe({"model": "digits-cnn", "stages": [{"factorize": stage}]})

  pipeline = prepare(recipe("svd"), progress=False)
  x_test = np.asarray(pipeline.dataset.x_test)
  test = collect(pipeline.model.apply, pipeline.tree, [x_test], "dense1/kernel",
                 {"gram": gram_reducer()})  # fmt: skip
  gram = np.asarray(test.stats["dense1/kernel"]["gram"][0], np.float64)
  w = np.asarray(pipeline.tree["dense1"]["kernel"], np.float64)
  error, accuracy = {}, {}
  for method in ("svd", "whitened"):
    out = run_stages(recipe(method), pipeline)
    d = w - np.asarray(materialize(out.tree["dense1"]["kernel"]), np.float64)
    # dense1's output error on the test images, which calibration (training images) never saw.
    error[method] = np.sqrt(np.trace(d.T @ gram @ d) / np.trace(w.T @ gram @ w))
    accuracy[method] = evaluate_tree(out.model, out.tree, out.dataset)
  assert error["whitened"] < 0.5 * error["svd"], error  # measured 0.146 against 0.823
  assert accuracy["whitened"] >= accuracy["svd"] - 2 / 360, accuracy
