"""GPTQ: layer error vs round-to-nearest, variants, Hessian failures, tiny-lm, bad input."""

import dataclasses
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from jaxshrink.errors import JaxshrinkError, NoMatchError
from jaxshrink.quant import QArray, QuantSpec, quantize
from jaxshrink.quant.gptq import gptq, gptq_kernel, gptq_matrix
from jaxshrink.quant.ptq import LayerQuant
from jaxshrink.tree import Rule, flatten, map_selected

K, N, ROWS = 48, 24, 256
LM_RULE = Rule(r".*kernel", min_ndim=2)


@pytest.fixture(scope="module")
def layer():
  """A random linear layer fed by correlated inputs with uneven channel scales."""
  rng = np.random.default_rng(0)
  mix = rng.normal(size=(K, K)) * 0.4 + np.eye(K)
  x = (rng.normal(size=(ROWS, K)) @ mix * rng.uniform(0.2, 3.0, size=K)).astype(np.float32)
  w = rng.normal(size=(K, N)).astype(np.float32)
  return x, w, jnp.asarray(2.0 / ROWS * x.T @ x)


def _output_error(x, w, wq):
  return float(np.linalg.norm(x @ w - x @ np.asarray(wq, np.float32)))


def _reference_gptq(w, h, spec, damp=0.01):
  """Textbook per-channel GPTQ in float64, one row at a time (Frantar et al. Alg. 1)."""
  scale = np.asarray(quantize(jnp.asarray(w), spec).scale, np.float64)
  h = np.asarray(h, np.float64) + damp * np.mean(np.diag(h)) * np.eye(len(h))
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  w = np.asarray(w, np.float64).copy()
  codes = np.zeros(w.shape, np.int32)
  for i in range(w.shape[0]):
    codes[i] = np.clip(np.round(w[i] / scale[0]), spec.qmin, spec.qmax)
    err = (w[i] - codes[i] * scale[0]) / u[i, i]
    w[i + 1 :] -= np.outer(u[i, i + 1 :], err)
  return codes


SPECS = [
  QuantSpec(bits=4),
  QuantSpec(bits=3, group_size=16),
  QuantSpec(bits=4, symmetric=False, group_size=16),
  QuantSpec(bits=2, symmetric=False),
]


@pytest.mark.parametrize(
  ("spec", "act_order"),
  [(SPECS[0], False), (SPECS[1], False), (SPECS[1], True), (SPECS[2], True), (SPECS[3], False)],
  ids=lambda v: v.describe() if isinstance(v, QuantSpec) else f"act_order={v}",
)
def test_gptq_beats_rounding_on_a_linear_layer(layer, spec, act_order):
  x, w, h = layer
  q = gptq_kernel(jnp.asarray(w), h, spec, act_order=act_order, block_size=16, path="fc/kernel")
  rtn = quantize(jnp.asarray(w), spec)
  assert isinstance(q, QArray) and q.shape == (K, N) and q.scale.shape == rtn.scale.shape
  assert q.group_size == spec.group_size and q.bits == spec.bits
  codes = np.asarray(q.unpacked_codes())
  assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
  assert _output_error(x, w, q.materialize()) < 0.85 * _output_error(x, w, rtn.materialize())


def test_matches_a_float64_reference(layer):
  x, w, h = layer
  spec = QuantSpec(bits=4)
  codes, scale, zp = gptq_matrix(jnp.asarray(w), h, spec, block_size=16)
  want = _reference_gptq(w, h, spec)
  assert zp is None and scale.shape == (1, N)
  # Float32 vs float64 error propagation may flip a rounding tie-break here and there.
  assert np.mean(np.asarray(codes) == want) > 0.98


def test_block_size_does_not_change_the_result(layer):
  _, w, h = layer
  spec = QuantSpec(bits=3, group_size=16)
  small = np.asarray(gptq_matrix(jnp.asarray(w), h, spec, block_size=16)[0])
  large = np.asarray(gptq_matrix(jnp.asarray(w), h, spec, block_size=48)[0])
  assert np.mean(small == large) > 0.99


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", SPECS[:3], ids=lambda s: s.describe())
def test_diagonal_hessian_reduces_to_rounding(layer, spec, act_order):
  # No input correlation: no error is propagated, so GPTQ is exactly round-to-nearest.
  _, w, _ = layer
  h = jnp.diag(jnp.linspace(0.5, 3.0, K))
  codes, scale, zp = gptq_matrix(jnp.asarray(w), h, spec, act_order=act_order)
  rtn = quantize(jnp.asarray(w), spec)
  np.testing.assert_array_equal(codes, rtn.unpacked_codes())
  np.testing.assert_array_equal(jnp.asarray(scale, rtn.scale.dtype), rtn.scale)


def test_act_order_with_groups_uses_static_groups(layer):
  _, w, h = layer
  spec = QuantSpec(bits=3, group_size=16)
  codes, scale, _ = gptq_matrix(jnp.asarray(w), h, spec, act_order=True)
  # Static groups: scales from the original weights, groups stay contiguous runs of K.
  np.testing.assert_array_equal(scale, quantize(jnp.asarray(w), spec).scale.astype(jnp.float32))
  assert codes.shape == (K, N) and scale.shape == (K // 16, N)


def test_dead_inputs_are_rounded_to_nearest(layer):
  x, w, _ = layer
  x = x.copy()
  x[:, 5] = 0.0
  h = jnp.asarray(2.0 / ROWS * x.T @ x)
  spec = QuantSpec(bits=4)
  codes, _, _ = gptq_matrix(jnp.asarray(w), h, spec)
  np.testing.assert_array_equal(codes[5], quantize(jnp.asarray(w), spec).unpacked_codes()[5])


def test_conv_kernel_and_group_fallback(layer):
  x, _, _ = layer
  kernel = np.random.default_rng(1).normal(size=(3, 3, 2, 8)).astype(np.float32)
  patches = x[:, :18]
  h = jnp.asarray(2.0 / ROWS * patches.T @ patches)
  with pytest.warns(UserWarning, match="group_size=32 is larger than .* `conv/kernel`"):
    q = gptq_kernel(
      kernel, h, QuantSpec(bits=4, group_size=32), contract_dims=(0, 1, 2), path="conv/kernel"
    )
  assert q.group_size is None and "per-channel" in q.describe()
  assert q.materialize().shape == kernel.shape


def test_singular_hessian_is_retried(layer):
  _, w, _ = layer
  h = jnp.ones((K, K))  # rank 1
  with pytest.warns(UserWarning, match="`fc/kernel` failed with damp=0; succeeded"):
    codes, _, _ = gptq_matrix(jnp.asarray(w), h, QuantSpec(bits=4), damp=0.0, path="fc/kernel")
  assert codes.shape == (K, N)


def test_nan_and_indefinite_hessians_name_the_layer(layer):
  _, w, h = layer
  with pytest.raises(JaxshrinkError, match="Hessian of `fc/kernel` holds NaN"):
    gptq_matrix(jnp.asarray(w), h.at[0, 0].set(jnp.nan), QuantSpec(bits=4), path="fc/kernel")
  indefinite = -jnp.eye(K)
  with pytest.raises(JaxshrinkError, match="`fc/kernel` failed 5 times.*larger `damp`"):
    gptq_matrix(jnp.asarray(w), indefinite, QuantSpec(bits=4), path="fc/kernel")


def test_bad_layer_inputs(layer):
  _, w, h = layer
  with pytest.raises(ValueError, match="Unsupported `bits`=5 for `fc/kernel`"):
    gptq_matrix(jnp.asarray(w), h, QuantSpec(bits=5), path="fc/kernel")
  with pytest.raises(ValueError, match="GPTQ produces integer codes"):
    gptq_matrix(jnp.asarray(w), h, QuantSpec(format="fp8_e4m3"))
  with pytest.raises(ValueError, match="`fc/kernel` holds NaN or Inf"):
    gptq_matrix(jnp.asarray(w).at[0, 0].set(jnp.inf), h, QuantSpec(bits=4), path="fc/kernel")
  with pytest.raises(TypeError, match="needs a float array"):
    gptq_matrix(jnp.asarray(w, jnp.int32), h, QuantSpec(bits=4))
  with pytest.raises(ValueError, match=r"expected \(48, 48\)"):
    gptq_matrix(jnp.asarray(w), h[:4, :4], QuantSpec(bits=4))
  with pytest.raises(ValueError, match="`block_size` must be a positive int"):
    gptq_matrix(jnp.asarray(w), h, QuantSpec(bits=4), block_size=0)
  with pytest.raises(TypeError, match="must be a jaxshrink.quant.QuantSpec"):
    gptq_matrix(jnp.asarray(w), h, {"bits": 4})


def _two_layers(p, x):
  return jnp.tanh(x @ p["a"]["kernel"]) @ p["b"]["kernel"]


def test_overrides_set_per_layer_specs_and_keep_layers_float(layer):
  x, w, _ = layer
  b = np.random.default_rng(2).normal(size=(N, 8)).astype(np.float32)
  params = {"a": {"kernel": jnp.asarray(w)}, "b": {"kernel": jnp.asarray(b)}}
  rule, spec = Rule(".*kernel"), QuantSpec(bits=4)
  base = gptq(_two_layers, params, [x], rule, spec)
  tree = gptq(_two_layers, params, [x], rule, spec, overrides=[("b/kernel", QuantSpec(bits=8))])
  assert (tree["a"]["kernel"].bits, tree["b"]["kernel"].bits) == (4, 8)
  # Each layer sees the float model's inputs: an override changes no other layer.
  np.testing.assert_array_equal(tree["a"]["kernel"].codes, base["a"]["kernel"].codes)
  skipped = gptq(_two_layers, params, [x], rule, spec, overrides=[("a/.*", None)])
  assert skipped["a"]["kernel"] is params["a"]["kernel"]
  np.testing.assert_array_equal(skipped["b"]["kernel"].codes, base["b"]["kernel"].codes)
  assert gptq(_two_layers, params, [x], rule, spec, overrides=[(".*", None)]) is params
  with pytest.raises(ValueError, match="GPTQ quantizes weights only.*`b/kernel`"):
    gptq(_two_layers, params, [x], rule, spec, overrides=[("b/kernel", LayerQuant(spec, 8))])
  with pytest.raises(ValueError, match="GPTQ produces integer codes.*`b/kernel`"):
    gptq(_two_layers, params, [x], rule, spec,
         overrides=[("b/kernel", QuantSpec(format="fp8_e4m3"))])  # fmt: skip
  with pytest.raises(NoMatchError, match="Override"):
    gptq(_two_layers, params, [x], rule, spec, overrides=[("c/kernel", None)])


# --- tiny-lm: the end-to-end target -------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tiny_lm_calibration):
  model, params, subset, batches = tiny_lm_calibration(seed=0, windows=64)
  return model, params, subset, batches


def _rtn(params, spec):
  return map_selected(lambda p, w: quantize(w, spec, contract_dims=(0,), path=p), params, LM_RULE)


def _perplexity(model, tree, dataset):
  from jaxshrink.evaluation import evaluate_tree

  return evaluate_tree(model, tree, dataset)


@pytest.mark.parametrize(
  ("spec", "act_order"),
  [(QuantSpec(bits=4), True), (QuantSpec(bits=3, group_size=32), False)],
  ids=["int4-act_order", "int3-g32"],
)
def test_gptq_beats_rtn_on_tiny_lm(lm, spec, act_order):
  model, params, subset, batches = lm
  tree = gptq(model.apply, params, batches, LM_RULE, spec, act_order=act_order)
  flat = flatten(tree)
  assert isinstance(flat["head/kernel"], QArray) and not isinstance(flat["embed/embedding"], QArray)
  float_ppl = _perplexity(model, params, subset)
  rtn_ppl = _perplexity(model, _rtn(params, spec), subset)
  gptq_ppl = _perplexity(model, tree, subset)
  assert float_ppl < gptq_ppl < rtn_ppl
  # GPTQ must close a real part of the gap RTN opens, not win by noise.
  assert gptq_ppl - float_ppl < 0.8 * (rtn_ppl - float_ppl)


def test_gptq_bad_calibration_and_rules(lm):
  model, params, _, batches = lm
  spec = QuantSpec(bits=4)
  with pytest.raises(JaxshrinkError, match="calibration set is empty"):
    gptq(model.apply, params, [], LM_RULE, spec)
  nan_batch = np.full((2, 8), np.nan, np.float32)
  with pytest.raises(JaxshrinkError, match="NaN or Inf"):
    gptq(lambda p, x: model.apply(p, x.astype(jnp.int32)), params, [nan_batch], LM_RULE, spec)
  with pytest.raises(NoMatchError, match="block_0/mlp/fc1/kernel"):
    gptq(model.apply, params, batches, Rule("conv.*"), spec)
  with pytest.raises(ValueError, match="Unsupported `bits`=16"):
    gptq(model.apply, params, batches, LM_RULE, dataclasses.replace(spec, bits=16))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with pytest.raises(JaxshrinkError, match="never reach a matmul"):
      gptq(model.apply, params, batches[:1], Rule(".*embedding|head/kernel"), spec)


@pytest.mark.parametrize(
  ("spec", "act_order"),
  [(SPECS[0], False), (SPECS[1], False), (SPECS[1], True), (SPECS[2], False)],
  ids=lambda v: v.describe() if isinstance(v, QuantSpec) else f"act_order={v}",
)
def test_pruned_weights_stay_zero_and_gptq_still_beats_rounding(layer, spec, act_order):
  x, w, h = layer
  pruned = w.copy()
  pruned[np.abs(w) < np.median(np.abs(w))] = 0.0  # 50% unstructured
  q = gptq_kernel(jnp.asarray(pruned), h, spec, act_order=act_order, block_size=16)
  wq = np.asarray(q.materialize())
  assert np.all(wq[pruned == 0] == 0.0)  # the mask survives exactly
  rtn = np.where(pruned == 0, 0.0, np.asarray(quantize(jnp.asarray(pruned), spec).materialize()))
  assert _output_error(x, pruned, wq) < _output_error(x, pruned, rtn)  # 5-15% less here
