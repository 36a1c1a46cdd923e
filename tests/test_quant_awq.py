"""AWQ: scale search on a linear layer, exact objective, tiny-lm perplexity, export, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshrink import export
from jaxshrink.encoding import materialize
from jaxshrink.errors import JaxshrinkError, NoMatchError
from jaxshrink.evaluation import evaluate_tree
from jaxshrink.quant import QArray, QuantSpec, quantize
from jaxshrink.quant.awq import _search, awq, awq_matrix, awq_scales
from jaxshrink.tree import Rule, flatten, map_selected

K, N, ROWS = 64, 32, 512
LM_RULE = Rule(r".*kernel", min_ndim=2)


@pytest.fixture(scope="module")
def layer():
  """A linear layer whose inputs have a few outlier channels, as in transformer activations."""
  rng = np.random.default_rng(0)
  gain = rng.uniform(0.3, 1.5, size=K)
  gain[[3, 17, 40]] = 12.0
  x = (rng.normal(size=(ROWS, K)) * gain).astype(np.float32)
  w = rng.normal(size=(K, N)).astype(np.float32)
  return x, w, jnp.asarray(x.T @ x / ROWS), jnp.asarray(np.abs(x).mean(0))


def _output_error(x, w, wq):
  return float(np.linalg.norm(x @ w - x @ np.asarray(wq, np.float32)))


def test_awq_scales_are_normalized():
  magnitude = jnp.asarray([0.5, 2.0, 8.0, 0.0])
  s = awq_scales(magnitude, jnp.float32(0.5))
  assert s.dtype == jnp.float32 and s.shape == (4,)
  np.testing.assert_allclose(float(jnp.sqrt(s.max() * s.min())), 1.0, rtol=1e-6)
  np.testing.assert_allclose(s[2] / s[1], 2.0, rtol=1e-6)  # (8 / 2) ** 0.5
  np.testing.assert_array_equal(awq_scales(magnitude, jnp.float32(0.0)), jnp.ones(4))


@pytest.mark.parametrize(
  "spec",
  [QuantSpec(bits=4), QuantSpec(bits=3, group_size=16), QuantSpec(bits=4, symmetric=False)],
  ids=lambda s: s.describe(),
)
def test_awq_beats_rounding_on_a_layer_with_outliers(layer, spec):
  x, w, gram, magnitude = layer
  codes, scale, zp, s, alpha = awq_matrix(jnp.asarray(w), gram, magnitude, spec, grid=10)
  assert codes.dtype == jnp.int32 and codes.shape == (K, N) and s.shape == (K,)
  assert 0.0 < alpha < 1.0 and (zp is None) == spec.symmetric
  q = QArray.from_codes(
    codes, scale, zp, spec, shape=(K, N), dtype="float32", contract_dims=(0,), input_scale=s
  )
  rtn = quantize(jnp.asarray(w), spec)
  assert _output_error(x, w, q.materialize()) < 0.9 * _output_error(x, w, rtn.materialize())
  # The weights of loud channels were scaled up, i.e. get finer steps.
  assert float(s[3]) > 1.0 and float(s[3]) > float(jnp.median(s))


def test_search_objective_is_the_output_error(layer):
  x, w, gram, magnitude = layer
  spec = QuantSpec(bits=4)
  losses = np.asarray(_search(jnp.asarray(w), gram, magnitude, spec=spec, grid=4))
  for i, alpha in enumerate([0.0, 0.25, 0.5, 0.75]):
    s = awq_scales(magnitude, jnp.float32(alpha))
    wq = (
      np.asarray(quantize(jnp.asarray(w) * s[:, None], spec).materialize()) / np.asarray(s)[:, None]
    )
    np.testing.assert_allclose(losses[i], _output_error(x, w, wq) ** 2 / ROWS, rtol=2e-3)


def test_grid_of_one_is_round_to_nearest(layer):
  _, w, gram, magnitude = layer
  spec = QuantSpec(bits=4, group_size=16)
  codes, scale, _, s, alpha = awq_matrix(jnp.asarray(w), gram, magnitude, spec, grid=1, clip=False)
  rtn = quantize(jnp.asarray(w), spec)
  assert alpha == 0.0
  np.testing.assert_array_equal(s, jnp.ones(K))
  np.testing.assert_array_equal(codes, rtn.unpacked_codes())
  np.testing.assert_array_equal(jnp.asarray(scale, rtn.scale.dtype), rtn.scale)


def test_bad_layer_inputs(layer):
  _, w, gram, magnitude = layer
  with pytest.raises(ValueError, match="Unsupported `bits`=6 for `fc/kernel`"):
    awq_matrix(jnp.asarray(w), gram, magnitude, QuantSpec(bits=6), path="fc/kernel")
  with pytest.raises(ValueError, match="AWQ produces integer codes"):
    awq_matrix(jnp.asarray(w), gram, magnitude, QuantSpec(format="fp8_e5m2"))
  with pytest.raises(ValueError, match="`fc/kernel` holds NaN or Inf"):
    awq_matrix(jnp.asarray(w) * jnp.nan, gram, magnitude, QuantSpec(bits=4), path="fc/kernel")
  with pytest.raises(ValueError, match="`grid` must be a positive int"):
    awq_matrix(jnp.asarray(w), gram, magnitude, QuantSpec(bits=4), grid=0)
  with pytest.raises(ValueError, match=r"expected \(64, 64\) and \(64,\)"):
    awq_matrix(jnp.asarray(w), gram[:2], magnitude, QuantSpec(bits=4))


# --- tiny-lm: the end-to-end target -------------------------------------------------------


def test_overrides_set_per_layer_specs_and_keep_layers_float(layer):
  x, w, _, _ = layer
  b = np.random.default_rng(2).normal(size=(N, 8)).astype(np.float32)
  params = {"a": {"kernel": jnp.asarray(w)}, "b": {"kernel": jnp.asarray(b)}}

  def apply(p, x):
    return jnp.tanh(x @ p["a"]["kernel"]) @ p["b"]["kernel"]

  rule, spec = Rule(".*kernel"), QuantSpec(bits=4)
  base = awq(apply, params, [x], rule, spec)
  overrides = [("b/kernel", QuantSpec(bits=3, group_size=16)), ("a/kernel", None)]
  tree = awq(apply, params, [x], rule, spec, overrides=overrides)
  assert tree["a"]["kernel"] is params["a"]["kernel"]
  q = tree["b"]["kernel"]
  assert (q.bits, q.group_size, q.input_scale.shape) == (3, 16, (N,))
  assert not np.array_equal(q.codes, base["b"]["kernel"].codes)
  with pytest.raises(ValueError, match="AWQ produces integer codes.*`b/kernel`"):
    awq(apply, params, [x], rule, spec, overrides=[("b/kernel", QuantSpec(format="fp8_e5m2"))])


@pytest.fixture(scope="module")
def lm(tiny_lm_calibration):
  model, params, subset, batches = tiny_lm_calibration(seed=1, windows=128)
  spec = QuantSpec(bits=4)
  tree = awq(model.apply, params, batches, LM_RULE, spec, grid=10)
  return model, params, subset, batches, spec, tree


def test_awq_beats_rtn_on_tiny_lm(lm):
  model, params, subset, _, spec, tree = lm
  flat = flatten(tree)
  q = flat["block_0/mlp/fc2/kernel"]
  assert isinstance(q, QArray) and q.input_scale.shape == (q.k,) and "awq alpha=" in q.note
  rtn = map_selected(lambda p, w: quantize(w, spec, path=p), params, LM_RULE)
  float_ppl = evaluate_tree(model, params, subset)
  rtn_ppl = evaluate_tree(model, rtn, subset)
  awq_ppl = evaluate_tree(model, tree, subset)
  assert float_ppl < awq_ppl < rtn_ppl


def test_awq_tree_exports_and_runs_under_jit(lm, tmp_path):
  model, _, subset, _, _, tree = lm
  export.save(tmp_path / "awq", tree)
  loaded = export.load(tmp_path / "awq")
  want = jax.jit(lambda t, x: model.apply(materialize(t), x))(tree, subset.x_test[:4])
  got = jax.jit(lambda t, x: model.apply(materialize(t), x))(loaded, subset.x_test[:4])
  np.testing.assert_array_equal(got, want)


def test_awq_bad_calibration_and_rules(lm):
  model, params, _, batches, spec, _ = lm
  with pytest.raises(JaxshrinkError, match="calibration set is empty"):
    awq(model.apply, params, iter([]), LM_RULE, spec)
  with pytest.raises(JaxshrinkError, match="NaN or Inf"):
    awq(
      lambda p, x: model.apply(p, x.astype(jnp.int32)),
      params,
      [np.full((2, 8), np.inf, np.float32)],
      LM_RULE,
      spec,
    )
  with pytest.raises(NoMatchError, match="block_0/mlp/fc1/kernel"):
    awq(model.apply, params, batches, Rule("nothing/.*"), spec)
  with pytest.raises(ValueError, match="Unsupported `bits`=1"):
    awq(model.apply, params, batches, LM_RULE, QuantSpec(bits=1))
  with pytest.raises(ValueError, match="`grid` must be a positive int"):
    awq(model.apply, params, batches, LM_RULE, spec, grid=-2)
