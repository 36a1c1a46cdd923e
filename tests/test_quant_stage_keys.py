"""The `quantize` stage on digits-cnn: every key is honoured by the method or refused.

GPTQ and AWQ honour `overrides` (per-layer specs and `skip`) and W8A8 activations
(`activation_bits`, `calibration`, `static_activations`) exactly as rtn does; a key a method
does not read, set away from its default, is a `UsageError` naming it. Activation scales are
dynamic per token unless `static_activations: true`.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshrink import export, recipes
from jaxshrink.errors import UsageError
from jaxshrink.evaluation import evaluate_tree
from jaxshrink.pipeline import RULE_OPTIONS
from jaxshrink.quant import QArray, QuantSpec
from jaxshrink.quant.calibrate import calibrate
from jaxshrink.quant.gptq import gptq
from jaxshrink.quant.ptq import ptq
from jaxshrink.quant.serve import IntegerPathWarning, quantized_apply
from jaxshrink.quant.stage import METHOD_KEYS, METHODS, OPTIONS, SPEC_KEYS, quantize_stage
from jaxshrink.tree import Rule, flatten

KERNELS = ("conv1/kernel", "conv2/kernel", "dense1/kernel", "dense2/kernel")
RULE = Rule(".*kernel", min_ndim=2)


@pytest.fixture(scope="module")
def pipeline():
  recipe = recipes.parse_recipe({"model": "digits-cnn"})
  return recipes.prepare(recipe, progress=False)


def _options(**given):
  recipe = recipes.parse_recipe({"model": "digits-cnn", "stages": [{"quantize": given}]})
  return recipe.stages[0][1]


def _run(pipeline, **given) -> dict:
  """The stage's tree, nested as the model takes it."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # group fallbacks on the small convs
    return quantize_stage(pipeline, _options(calibration_batches=1, **given)).tree


def _batches(pipeline):
  return [np.asarray(pipeline.dataset.x_train[: pipeline.model.batch_size])]


def _rtn_w8a8(pipeline, **kw) -> dict:
  """What rtn's `ptq` makes of the same calibration batch: the static activation-scale reference."""
  spec = QuantSpec(bits=8)
  tree = ptq(
    pipeline.model.apply, pipeline.tree, _batches(pipeline), RULE, spec, **kw, activation_bits=8,
    static_activations=True,
  )  # fmt: skip
  return flatten(tree)


@pytest.fixture(scope="module")
def gptq_w8a8(pipeline):
  return _run(
    pipeline,
    method="gptq",
    weight_bits=4,
    activation_bits=8,
    static_activations=True,
    overrides=[
      {"target": "conv1/kernel", "skip": True},
      {"target": "dense2/kernel", "weight_bits": 8, "symmetric": False},
    ],
    sequential=False,  # one pass on the float activations, comparable with plain `gptq`
  )


def test_every_key_is_read_by_some_method_or_refused():
  # A new key must be classified here, so no key can slip in accepted and ignored.
  general = {*RULE_OPTIONS, *SPEC_KEYS, "method", "overrides", "embeddings"}
  activations = {"calibration_batches", "calibration_data", "calibration", "static_activations"}
  assert set(OPTIONS) == general | activations | set(METHOD_KEYS)
  assert all(set(methods) <= set(METHODS) for methods, _ in METHOD_KEYS.values())


def test_gptq_overrides_skip_and_per_layer_bits(pipeline, gptq_w8a8):
  tree = flatten(gptq_w8a8)
  conv1 = tree["conv1/kernel"]
  assert isinstance(conv1, jax.Array) and conv1.dtype == jnp.float32
  np.testing.assert_array_equal(conv1, flatten(pipeline.tree)["conv1/kernel"])
  assert (tree["conv2/kernel"].bits, tree["dense1/kernel"].bits) == (4, 4)
  dense2 = tree["dense2/kernel"]
  assert dense2.bits == 8 and not dense2.symmetric and dense2.zero_point.dtype == jnp.int8
  # One pass: each layer is quantized from the float activations, so the override changes no
  # other layer.
  batches = _batches(pipeline)
  plain = gptq(
    pipeline.model.apply, pipeline.tree, batches, RULE, QuantSpec(bits=4), act_order=True
  )
  plain = flatten(plain)
  for path in ("conv2/kernel", "dense1/kernel"):
    np.testing.assert_array_equal(tree[path].unpacked_codes(), plain[path].unpacked_codes())
  assert not np.array_equal(dense2.unpacked_codes(), plain["dense2/kernel"].unpacked_codes())


def test_gptq_w8a8_matches_ptq_activation_scales(pipeline, gptq_w8a8):
  ref = _rtn_w8a8(pipeline)
  for path in KERNELS[1:]:
    q = flatten(gptq_w8a8)[path]
    assert q.act_bits == 8 and q.act_scale.dtype == np.float32 and q.act_scale.shape == (1,)
    np.testing.assert_array_equal(q.act_scale, ref[path].act_scale)
    assert "act int8 static" in q.describe()


def test_gptq_w8a8_exports_reloads_and_evaluates(pipeline, gptq_w8a8, tmp_path):
  model, dataset = pipeline.model, pipeline.dataset
  export.save(tmp_path / "ckpt", gptq_w8a8, model="digits-cnn")
  reloaded = export.load(tmp_path / "ckpt")
  flat, want = flatten(reloaded), flatten(gptq_w8a8)
  assert isinstance(flat["conv1/kernel"], np.ndarray)
  for path in KERNELS[1:]:
    assert flat[path].act_bits == 8 and flat[path].bits == want[path].bits
    np.testing.assert_array_equal(flat[path].act_scale, want[path].act_scale)
    np.testing.assert_array_equal(flat[path].codes, want[path].codes)
  # The three quantized kernels run int8 x int8 -> int32; conv1 was skipped and stays float.
  jaxpr = str(jax.make_jaxpr(quantized_apply(model.apply))(reloaded, dataset.x_test[:2]))
  assert jaxpr.count("preferred_element_type=int32") == 3
  accuracy = evaluate_tree(model, reloaded, dataset)
  assert accuracy == evaluate_tree(model, gptq_w8a8, dataset)
  assert accuracy >= evaluate_tree(model, pipeline.float_params, dataset) - 0.01


def test_gptq_dynamic_activations_by_default_and_calibration_method(pipeline, gptq_w8a8):
  dynamic = flatten(_run(pipeline, method="gptq", weight_bits=4, activation_bits=8))
  for path in KERNELS:
    assert dynamic[path].act_bits == 8 and dynamic[path].act_scale is None
    assert "act int8 dynamic" in dynamic[path].describe()
  skip = [{"target": "conv1/kernel", "skip": True}]
  mse = _run(
    pipeline, method="gptq", weight_bits=4, activation_bits=8, static_activations=True,
    calibration="mse", overrides=skip,
  )  # fmt: skip
  mse = flatten(mse)
  ref = _rtn_w8a8(pipeline, calibration="mse")
  for path in KERNELS[1:]:
    np.testing.assert_array_equal(mse[path].act_scale, ref[path].act_scale)
  # MSE clipping really clips: some layer's scale is below its absmax one.
  absmax = flatten(gptq_w8a8)
  assert any(mse[p].act_scale[0] < absmax[p].act_scale[0] for p in KERNELS[1:])


def test_gptq_activation_bits_per_override(pipeline):
  tree = flatten(
    _run(
      pipeline,
      method="gptq",
      weight_bits=4,
      static_activations=True,
      overrides=[{"target": "dense1/kernel", "activation_bits": 8}],
    )
  )
  assert tree["dense1/kernel"].act_bits == 8 and tree["dense1/kernel"].act_scale is not None
  for path in ("conv1/kernel", "conv2/kernel", "dense2/kernel"):
    assert isinstance(tree[path], QArray) and tree[path].act_bits is None


def test_awq_overrides_and_w8a8(pipeline):
  nested = _run(
    pipeline,
    method="awq",
    weight_bits=4,
    activation_bits=8,
    static_activations=True,
    overrides=[
      {"target": "conv2/kernel", "skip": True},
      {"target": "dense2/kernel", "weight_bits": 3, "group_size": 32},
    ],
  )
  tree = flatten(nested)
  assert isinstance(tree["conv2/kernel"], jax.Array)
  assert tree["dense1/kernel"].bits == 4 and tree["dense1/kernel"].group_size is None
  assert tree["dense2/kernel"].bits == 3 and tree["dense2/kernel"].group_size == 32
  # AWQ's kernels meet x / input_scale, so that is what the static clip is calibrated on.
  paths = ("conv1/kernel", "dense1/kernel", "dense2/kernel")
  scales = {p: np.asarray(tree[p].input_scale) for p in paths}
  want = calibrate(
    pipeline.model.apply,
    pipeline.tree,
    _batches(pipeline),
    Rule("|".join(paths)),
    input_scales=scales,
  )
  unscaled = calibrate(
    pipeline.model.apply, pipeline.tree, _batches(pipeline), Rule("dense2/kernel")
  )
  for path in paths:
    assert tree[path].act_bits == 8 and tree[path].input_scale is not None
    np.testing.assert_allclose(tree[path].act_scale, [want[path].clip / 127], rtol=1e-6)
  assert tree["dense2/kernel"].act_scale[0] != pytest.approx(unscaled["dense2/kernel"].clip / 127)
  model, dataset = pipeline.model, pipeline.dataset
  # The integer conv cannot divide by an input scale: AWQ's conv1 runs in float on
  # fake-quantized activations, and serving says so by path.
  with pytest.warns(IntegerPathWarning, match="conv1/kernel"):
    accuracy = evaluate_tree(model, nested, dataset)
  assert accuracy >= evaluate_tree(model, pipeline.float_params, dataset) - 0.01


def test_qat_honours_activation_settings(pipeline):
  tree = flatten(_run(pipeline, method="qat", steps=2, weight_bits=8, activation_bits=8))
  for path in KERNELS:
    assert tree[path].act_bits == 8 and tree[path].act_scale is None
  # An override's activation bits alone make it a W8A8 layer, here with a calibrated scale.
  tree = flatten(
    _run(
      pipeline,
      method="qat",
      steps=2,
      weight_bits=8,
      static_activations=True,
      overrides=[{"target": "dense2/kernel", "activation_bits": 8}],
    )
  )
  assert tree["dense2/kernel"].act_scale is not None and tree["dense1/kernel"].act_bits is None


NON_DEFAULT = {
  "steps": 5,
  "learning_rate": 1e-3,
  "alpha": 0.8,
  "act_order": False,
  "damp": 0.1,
  "grid": 5,
  "sequential": False,
}
MISPLACED = [
  (method, key)
  for key, (methods, _) in METHOD_KEYS.items()
  for method in METHODS
  if method not in methods
]


@pytest.mark.parametrize(("method", "key"), MISPLACED, ids=[f"{m}-{k}" for m, k in MISPLACED])
def test_method_keys_are_refused_by_other_methods(pipeline, method, key):
  given = {"method": method, "activation_bits": 8, key: NON_DEFAULT[key]}
  with pytest.raises(UsageError, match=rf"`{key}: .*does not apply to method `{method}`"):
    quantize_stage(pipeline, _options(**given))


@pytest.mark.parametrize(
  ("given", "match"),
  [
    ({"method": "rtn", "calibration": "mse"}, r"`calibration: 'mse'`.*no layer has `activation"),
    ({"method": "gptq", "calibration": "percentile"}, r"`calibration: 'percentile'`.*`gptq`"),
    ({"method": "awq", "static_activations": True}, r"`static_activations: True`.*`awq`"),
    (
      {"method": "rtn", "static_activations": True},
      r"`static_activations: True`.*no layer has `activation_bits`.*Set `activation_bits: 8`",
    ),
    ({"method": "rtn", "calibration_batches": 2}, r"`calibration_batches: 2`.*weight-only rtn"),
    ({"method": "qat", "calibration_batches": 2}, r"`calibration_batches: 2`.*weight-only qat"),
    ({"method": "rtn", "calibration_data": "corpus"}, r"`calibration_data: 'corpus'`.*weight-only"),
    ({"method": "gptq", "calibration_data": "books"}, r"`calibration_data` of stage `quantize`"),
    (
      {"method": "gptq", "calibration_data": "corpus"},
      r"`calibration_data: corpus` of stage `quantize` feeds MiniLM token ids.*'digits-cnn'.*"
      r"`calibration_data: train`",
    ),
    (
      {"activation_bits": 8, "calibration": "mse"},
      r"`calibration: 'mse'` of `quantize` .* needs `static_activations: true`; got "
      r"`static_activations: false` \(the default.*Set `static_activations: true`, or remove "
      r"`calibration`",
    ),
    (
      {"method": "gptq", "activation_bits": 8, "static_activations": False, "calibration": "mse"},
      r"`calibration: 'mse'`.*needs `static_activations: true`",
    ),
    ({"method": "smoothquant"}, r"`smoothquant`.*no layer has `activation_bits`"),
    ({"method": "gptq", "format": "fp8_e4m3"}, r"`format: 'fp8_e4m3'`.*`gptq`.*integer codes"),
    (
      {"method": "awq", "overrides": [{"target": "dense2/kernel", "format": "fp8_e5m2"}]},
      r"`overrides\[0\]\.format: 'fp8_e5m2'`.*`awq`",
    ),
    (
      {"method": "gptq", "overrides": [{"target": "conv1/kernel", "skip": True, "weight_bits": 4}]},
      r"`overrides\[0\]`.*`skip: true`.*also sets weight_bits",
    ),
    ({"overrides": [{"target": "conv1/kernel", "skip": "yes"}]}, r"`overrides\[0\]\.skip`"),
    (
      {"method": "gptq", "activation_bits": 8, "calibration": "minmax"},
      r"`calibration` 'minmax' was removed",
    ),
  ],
)
def test_unused_settings_are_refused(pipeline, given, match):
  with pytest.raises(UsageError, match=match):
    quantize_stage(pipeline, _options(**given))


def test_dynamic_w8a8_rtn_still_takes_calibration_batches(pipeline):
  # Dynamic scales (the default) still run one calibration pass: it finds each kernel's input
  # axes.
  tree = flatten(_run(pipeline, activation_bits=8))
  assert all(tree[p].act_bits == 8 and tree[p].act_scale is None for p in KERNELS)
  assert OPTIONS["static_activations"] is False


def test_static_w8a8_rtn_matches_ptq(pipeline):
  tree = flatten(_run(pipeline, activation_bits=8, static_activations=True, calibration="mse"))
  ref = _rtn_w8a8(pipeline, calibration="mse")
  for path in KERNELS:
    np.testing.assert_array_equal(tree[path].act_scale, ref[path].act_scale)
    assert "act int8 static" in tree[path].describe()
