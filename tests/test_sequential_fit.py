"""Sequential calibration moves each block toward the float model's outputs (the asymmetric
objective): the paired statistics, the float target GPTQ, AWQ and SparseGPT fit and the mask
Wanda picks, checked on small matrices against direct computation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshrink.hessian import collect_hessians
from jaxshrink.quant import QuantSpec
from jaxshrink.quant.awq import awq
from jaxshrink.quant.gptq import gptq
from jaxshrink.sequential import float_output_error, float_target, paired_statistics
from jaxshrink.sparsity import Pruner
from jaxshrink.sparsity.oneshot import _sparsegpt_with_masks
from jaxshrink.sparsity.wanda import _closest_to_float, _wanda_with_masks


def _apply(params, x):
  h = jnp.tanh(x @ params["fc1"]["kernel"])
  return h @ params["fc2"]["kernel"]


@pytest.fixture(scope="module")
def setup():
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    "fc1": {"kernel": jax.random.normal(keys[0], (16, 24)) / 4},
    "fc2": {"kernel": jax.random.normal(keys[1], (24, 8)) / 5},
  }
  batches = [jax.random.normal(k, (64, 16)) for k in keys[2:]]
  # The model as an earlier block left it: fc1 perturbed, as rounding would.
  noisy = jax.random.normal(jax.random.key(1), (16, 24)) / 20
  tree = {**params, "fc1": {"kernel": params["fc1"]["kernel"] + noisy}}
  return params, tree, batches


def test_paired_statistics_pair_the_rows_of_the_two_forwards(setup):
  params, tree, batches = setup
  found = paired_statistics(_apply, params, tree, batches, ["fc1/kernel", "fc2/kernel"])
  x = np.concatenate([np.asarray(b) for b in batches])
  h_float = np.tanh(x @ np.asarray(params["fc1"]["kernel"]))
  h = np.tanh(x @ np.asarray(tree["fc1"]["kernel"]))
  np.testing.assert_allclose(found["fc2/kernel"].gram, h.T @ h, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(found["fc2/kernel"].cross, h.T @ (h_float - h), rtol=1e-4, atol=1e-4)
  assert float(found["fc2/kernel"].count) == len(x)
  np.testing.assert_allclose(found["fc2/kernel"].float_sq, (h_float**2).sum(0), rtol=1e-4)
  # fc1 reads the input itself: both models give it the same rows, so nothing to correct.
  np.testing.assert_array_equal(found["fc1/kernel"].cross, 0.0)
  # Its Hessian is the one calibration collects on the compressed tree.
  h_one, _ = collect_hessians(_apply, tree, batches, "fc2/kernel")["fc2/kernel"]
  np.testing.assert_allclose(found["fc2/kernel"].hessian(), h_one, rtol=1e-4, atol=1e-5)


def test_a_batch_in_uneven_pieces_gives_the_same_statistics(setup, monkeypatch):
  from jaxshrink import sequential

  params, tree, batches = setup
  whole = paired_statistics(_apply, params, tree, batches, ["fc2/kernel"])["fc2/kernel"]
  monkeypatch.setattr(sequential, "PAIRED_EXAMPLES", 5)  # 64 rows: 12 pieces of 5 and one of 4
  pieces = paired_statistics(_apply, params, tree, batches, ["fc2/kernel"])["fc2/kernel"]
  for a, b in ((pieces.gram, whole.gram), (pieces.cross, whole.cross)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert float(pieces.count) == float(whole.count) == 128


def test_float_target_is_the_least_squares_map_to_the_float_outputs():
  rng = np.random.default_rng(0)
  x_f = rng.normal(size=(200, 12)).astype(np.float32)
  x = x_f + 0.1 * rng.normal(size=x_f.shape).astype(np.float32)
  w = rng.normal(size=(12, 5)).astype(np.float32)
  target = np.asarray(float_target(w, x.T @ x, x.T @ (x_f - x), damp=0.0, pull=1.0))
  best = np.linalg.lstsq(x, x_f @ w, rcond=None)[0]
  np.testing.assert_allclose(target, best, rtol=1e-3, atol=1e-3)
  assert np.linalg.norm(x_f @ w - x @ target) < np.linalg.norm(x_f @ w - x @ w)
  # Without carried-in error it is the weights themselves; exact zeros (pruned) stay zero.
  np.testing.assert_array_equal(float_target(w, x.T @ x, np.zeros((12, 12)), damp=0.01), w)
  w[3, 1] = 0.0
  assert float(float_target(w, x.T @ x, x.T @ (x_f - x), damp=0.01)[3, 1]) == 0.0


def test_a_failed_solve_keeps_the_kernel_and_warns_with_its_path():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(40, 6)).astype(np.float32)
  x[:, 5] = x[:, 4]  # a repeated input: the Gram matrix is singular, and undamped it fails
  x_f = x + 0.1 * rng.normal(size=x.shape).astype(np.float32)
  w = rng.normal(size=(6, 3)).astype(np.float32)
  with pytest.warns(UserWarning, match=r"`fc2/kernel`.*not moved toward the float"):
    kept = float_target(w, x.T @ x, x.T @ (x_f - x), damp=0.0, path="fc2/kernel")
  np.testing.assert_array_equal(kept, w)


def test_float_output_error_is_the_distance_to_the_float_outputs_less_a_constant():
  rng = np.random.default_rng(1)
  x_f = rng.normal(size=(100, 10)).astype(np.float32)
  x = x_f + 0.2 * rng.normal(size=x_f.shape).astype(np.float32)
  w = rng.normal(size=(10, 4)).astype(np.float32)
  kept = np.where(rng.random(w.shape) < 0.5, w, 0.0).astype(np.float32)
  error = float(float_output_error(w, kept, x.T @ x, x.T @ (x_f - x)))
  direct = np.sum((x_f @ w - x @ kept) ** 2) - np.sum((x_f @ w) ** 2)
  np.testing.assert_allclose(error, direct, rtol=1e-4)


def test_sequential_wanda_keeps_one_pass_masks_unless_another_lands_closer(setup):
  params, tree, batches = setup
  pruner = Pruner("fc2/kernel", 0.5)
  one_pass = _wanda_with_masks(_apply, params, batches, pruner)[1]["fc2"]["kernel"]
  # On the float model itself (a first block) every ranking agrees with one pass.
  same = _wanda_with_masks(_apply, params, batches, pruner, reference=params)[1]
  np.testing.assert_array_equal(same["fc2"]["kernel"], one_pass)
  # After fc1 was perturbed, the mask chosen lands at least as close to the float outputs as
  # one pass's, on the compressed model's inputs.
  chosen = _wanda_with_masks(_apply, tree, batches, pruner, reference=params)[0]
  one_pass_tree = {**tree, "fc2": {"kernel": jnp.where(one_pass, tree["fc2"]["kernel"], 0.0)}}
  assert float(jnp.mean(chosen["fc2"]["kernel"] == 0)) == 0.5
  assert _output_error(params, chosen, batches) <= _output_error(params, one_pass_tree, batches)


def test_sequential_wanda_copies_only_its_block_and_compiles_once_per_kernel_shape(setup):
  # Its peak memory grew by the model's size per block when every leaf was copied and every
  # mask traced anew (MiniLM); now the other leaves pass through and the mask function is
  # compiled once for a shape, whichever block asks.
  params, tree, batches = setup
  pruned = _wanda_with_masks(_apply, tree, batches, Pruner("fc2/kernel", 0.5), reference=params)[0]
  assert pruned["fc1"]["kernel"] is tree["fc1"]["kernel"]
  compiled = _closest_to_float._cache_size()
  again = {**tree, "fc2": {"kernel": tree["fc2"]["kernel"] * 2.0}}  # another block, same shape
  _wanda_with_masks(_apply, again, batches, Pruner("fc2/kernel", 0.5), reference=params)
  assert _closest_to_float._cache_size() == compiled


def _output_error(params, tree, batches):
  h_float = [jnp.tanh(b @ params["fc1"]["kernel"]) for b in batches]
  h = [jnp.tanh(b @ tree["fc1"]["kernel"]) for b in batches]
  w = tree["fc2"]["kernel"]
  w = w.materialize() if hasattr(w, "materialize") else w
  return sum(
    float(jnp.sum((hf @ params["fc2"]["kernel"] - hc @ w) ** 2))
    for hf, hc in zip(h_float, h, strict=True)
  )


@pytest.mark.parametrize("method", ["gptq", "awq", "sparsegpt"])
def test_a_later_block_fitted_to_the_float_model_lands_closer_to_its_outputs(setup, method):
  params, tree, batches = setup
  if method in ("gptq", "awq"):
    fit = gptq if method == "gptq" else awq

    def run(reference):
      spec = QuantSpec(bits=3, group_size=8, symmetric=False)
      return fit(_apply, tree, batches, "fc2/kernel", spec, reference=reference)
  else:

    def run(reference):
      pruner = Pruner("fc2/kernel", 0.5)
      return _sparsegpt_with_masks(_apply, tree, batches, pruner, reference=reference)[0]

  asymmetric = _output_error(params, run(params), batches)
  symmetric = _output_error(params, run(None), batches)
  assert asymmetric < symmetric


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name="embed")(x)

    class Step(nn.Module):
      @nn.compact
      def __call__(self, x, _):
        return x + nn.Dense(8, name="fc")(jnp.tanh(x)), None

    layers = nn.scan(Step, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return layers(name="layers")(x, None)[0]


def test_a_stacked_kernel_gets_paired_statistics_per_layer():
  model = _Scanned()
  x = jax.random.normal(jax.random.key(2), (32, 8))
  params = model.init(jax.random.key(3), x)["params"]
  tree = jax.tree.map(lambda a: a, params)
  tree["embed"]["kernel"] = params["embed"]["kernel"] * 1.1

  def apply(p, x):
    return model.apply({"params": p}, x)

  found = paired_statistics(apply, params, tree, [x], ["layers/fc/kernel"])["layers/fc/kernel"]
  assert found.site.layers == 3 and found.gram.shape == (3, 8, 8) and found.count.shape == (3,)
  assert found.float_sq.shape == (3, 8)
  h_one, _ = collect_hessians(apply, tree, [x], "layers/fc/kernel")["layers/fc/kernel"]
  np.testing.assert_allclose(found.hessian(), h_one, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(found.cross).max()) > 0
  # Sequential Wanda picks each layer's mask on its own statistics.
  masks = _wanda_with_masks(apply, tree, [x], Pruner("layers/fc/kernel", 0.5), reference=params)[1]
  kept = masks["layers"]["fc"]["kernel"]
  assert kept.shape == (3, 8, 8)
  np.testing.assert_array_equal(jnp.sum(kept, axis=(1, 2)), [32, 32, 32])


def test_bad_calibration_input_is_named_as_one_pass_names_it(setup):
  from jaxshrink.errors import JaxshrinkError

  params, tree, batches = setup
  with pytest.raises(JaxshrinkError, match="calibration set is empty"):
    paired_statistics(_apply, params, tree, [], ["fc2/kernel"])
  with pytest.raises(JaxshrinkError, match="batch 1 holds NaN or Inf"):
    paired_statistics(_apply, params, tree, [batches[0], batches[1] * np.nan], ["fc2/kernel"])

  def with_table(p, x):
    return _apply(p, x) + p["table"][0, 0]

  params = {**params, "table": jnp.ones((3, 8))}
  with pytest.raises(JaxshrinkError, match="never reach a matmul or conv: table"):
    paired_statistics(with_table, params, {**tree, "table": params["table"]}, batches, ["table"])
