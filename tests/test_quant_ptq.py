"""PTQ on digits-cnn (linen and nnx): W8A8 accuracy, checkpoint sizes, the recipe stage, QAT."""

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxshrink.quant.stage  # noqa: F401  (registers the `quantize` stage)
from jaxshrink import cli, data, export, models, recipes
from jaxshrink.encoding import materialize
from jaxshrink.errors import JaxshrinkError, NoMatchError, UsageError
from jaxshrink.quant import QArray, QuantSpec
from jaxshrink.quant.calibrate import calibrate
from jaxshrink.quant.ptq import LayerQuant, ptq, quantize_params
from jaxshrink.quant.qat import qat_apply
from jaxshrink.quant.serve import quantized_apply


@pytest.fixture(scope="module", params=["digits-cnn", "digits-cnn-nnx"])
def zoo(request):
  model = models.get_model(request.param)
  dataset = data.get_dataset(model.data)
  params = models.pretrained(model, progress=False)
  batches = [dataset.x_train[i : i + 128] for i in range(0, 512, 128)]
  return model, dataset, params, batches


def _accuracy(apply, tree, dataset):
  logits = jax.jit(apply)(tree, jnp.asarray(dataset.x_test))
  return float((np.asarray(logits).argmax(-1) == dataset.y_test).mean())


def test_w8a8_ptq_accuracy_integer_path_and_size(zoo, tmp_path):
  model, dataset, params, batches = zoo
  ctree = ptq(model.apply, params, batches, ".*kernel", QuantSpec(bits=8), activation_bits=8,
              static_activations=True)  # fmt: skip
  conv2 = ctree["conv2"]["kernel"]
  assert isinstance(conv2, QArray) and conv2.act_bits == 8 and conv2.act_scale.shape == (1,)
  jaxpr = str(jax.make_jaxpr(quantized_apply(model.apply))(ctree, dataset.x_test[:2]))
  assert jaxpr.count("preferred_element_type=int32") == 4  # 2 convs + 2 dense, all integer
  acc_float = _accuracy(model.apply, params, dataset)
  acc_int = _accuracy(quantized_apply(model.apply), ctree, dataset)
  assert acc_int >= acc_float - 0.005
  export.save(tmp_path / "w8a8", ctree)
  export.save(tmp_path / "f32", params)
  # Measured 3.63x; ~12 KB of manifest + orbax metadata keeps this tiny model under 3.9x.
  assert export.disk_bytes(tmp_path / "f32") / export.disk_bytes(tmp_path / "w8a8") >= 3.5


def test_w8a8_ptq_activation_scales_are_dynamic_by_default(zoo):
  model, dataset, params, batches = zoo
  ctree = ptq(model.apply, params, batches[:1], ".*kernel", QuantSpec(bits=8), activation_bits=8)
  for name in ("conv1", "conv2", "dense1", "dense2"):
    q = ctree[name]["kernel"]
    assert q.act_bits == 8 and q.act_scale is None and "act int8 dynamic" in q.describe()
  acc_float = _accuracy(model.apply, params, dataset)
  assert _accuracy(quantized_apply(model.apply), ctree, dataset) >= acc_float - 0.005


def test_int4_g128_size_and_fallback(zoo, tmp_path, capsys):
  model, dataset, params, _ = zoo
  if model.framework == "nnx":
    pytest.skip("same param paths and numerics as the linen twin; covered there")
  with pytest.warns(UserWarning, match="conv1/kernel"):
    ctree = quantize_params(params, ".*kernel", QuantSpec(bits=4, group_size=128))
  assert "g128 > K=9: per-channel" in ctree["conv1"]["kernel"].describe()
  dense1 = ctree["dense1"]["kernel"]
  assert dense1.codes.dtype == jnp.uint8 and dense1.nbytes / dense1.size <= 0.55
  export.save(tmp_path / "int4", ctree)
  export.save(tmp_path / "f32", params)
  assert export.disk_bytes(tmp_path / "f32") / export.disk_bytes(tmp_path / "int4") >= 6.9
  # `jaxshrink inspect` shows bits per weight, bytes and the group fallback per QArray leaf.
  assert cli.main(["inspect", str(tmp_path / "int4"), "--json"]) == 0
  layers = {row["path"]: row for row in json.loads(capsys.readouterr().out)["layers"]}
  assert layers["conv1/kernel"]["encoding"] == "qarray"
  assert "g128 > K=9: per-channel" in layers["conv1/kernel"]["description"]
  assert layers["dense1/kernel"]["bits_per_weight"] == pytest.approx(8 * dense1.nbytes / 1024 / 128)
  assert layers["dense1/kernel"]["bits_per_weight"] <= 4.4 and layers["dense1/kernel"]["bytes"] > 0
  apply = lambda t, x: model.apply(materialize(t), x)  # noqa: E731
  assert _accuracy(apply, ctree, dataset) >= _accuracy(model.apply, params, dataset) - 0.02


def test_calibration_methods_and_overrides(zoo):
  model, _, params, batches = zoo
  if model.framework == "nnx":
    pytest.skip("same param paths and numerics as the linen twin; covered there")
  stats = {m: calibrate(model.apply, params, batches, "dense.*kernel", method=m)
           for m in ("absmax", "percentile", "mse")}  # fmt: skip
  a, p, m = (stats[k]["dense1/kernel"].clip for k in ("absmax", "percentile", "mse"))
  assert a == pytest.approx(float(stats["absmax"]["dense1/kernel"].absmax.max()))
  assert p <= a and m <= a
  ctree = ptq(
    model.apply, params, batches, ".*kernel", QuantSpec(bits=4), activation_bits=None,
    calibration="mse", overrides=[("conv1/kernel|dense2/kernel", QuantSpec(bits=8))],
  )  # fmt: skip
  bits = {k: ctree[k]["kernel"].bits for k in ("conv1", "conv2", "dense1", "dense2")}
  assert bits == {"conv1": 8, "conv2": 4, "dense1": 4, "dense2": 8}
  smooth = ptq(model.apply, params, batches, "dense.*kernel", QuantSpec(bits=8),
               activation_bits=8, smooth_alpha=0.5)  # fmt: skip
  assert smooth["dense1"]["kernel"].input_scale.shape == (1024,)
  w = np.asarray(params["dense1"]["kernel"])
  err = np.linalg.norm(np.asarray(materialize(smooth["dense1"]["kernel"])) - w) / np.linalg.norm(w)
  assert err < 0.05  # SmoothQuant moves error between rows; the matrix stays close


def test_qat_apply_grad_and_convert(zoo):
  model, dataset, params, _ = zoo
  qapply = qat_apply(model.apply, ".*kernel", LayerQuant(QuantSpec(bits=2), 8))
  x, y = jnp.asarray(dataset.x_train[:32]), jnp.asarray(dataset.y_train[:32])
  loss = lambda p: models.cross_entropy_loss(qapply(p, x), y)  # noqa: E731
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(float(value))
  assert float(jnp.abs(grads["conv1"]["kernel"]).sum()) > 0
  ctree = quantize_params(params, ".*kernel", QuantSpec(bits=2))
  assert ctree["dense1"]["kernel"].codes.shape == (256, 128)  # 4 codes per byte


def test_minmax_calibration_is_refused_naming_absmax(zoo):
  """`minmax` equalled `absmax` (symmetric codes); it is a usage error naming the replacement."""
  model, _, params, batches = zoo
  if model.framework == "nnx":
    pytest.skip("argument checks do not depend on the framework")
  with pytest.raises(UsageError, match="`method` 'minmax' was removed.*Set `method` to 'absmax'"):
    calibrate(model.apply, params, batches, "dense.*kernel", method="minmax")
  with pytest.raises(UsageError, match="`calibration` 'minmax' was removed.*to 'absmax'"):
    ptq(model.apply, params, batches, ".*kernel", QuantSpec(), activation_bits=8,
        calibration="minmax")  # fmt: skip
  with pytest.raises(
    ValueError, match=r"must be one of \['absmax', 'percentile', 'mse'\]; got 'max'"
  ):
    calibrate(model.apply, params, batches, "dense.*kernel", method="max")
  recipe = recipes.parse_recipe({
    "model": "digits-cnn",
    "stages": [{"quantize": {"activation_bits": 8, "calibration": "minmax"}}],
  })  # fmt: skip
  with pytest.raises(UsageError, match="`calibration` 'minmax' was removed"):
    recipes.run_recipe(recipe, progress=False)


def test_bad_input(zoo):
  model, _, params, batches = zoo
  with pytest.raises(NoMatchError, match="matched no parameter"):
    quantize_params(params, "nothing/kernel", QuantSpec())
  with pytest.raises(NoMatchError, match=r"Override `overrides\[0\]`: Rule\(include='nope'\)"):
    quantize_params(params, ".*kernel", QuantSpec(), overrides=[("nope", None)])
  with pytest.raises(ValueError, match="Unsupported `bits`=6 for `conv1/kernel`"):
    quantize_params(params, ".*kernel", QuantSpec(bits=6))
  with pytest.raises(
    ValueError, match=r"`calibration='mse'` .* needs `static_activations=True`; got `static_"
  ):
    ptq(model.apply, params, batches, ".*kernel", QuantSpec(), activation_bits=8, calibration="mse")
  with pytest.raises(JaxshrinkError, match="calibration set is empty"):
    ptq(model.apply, params, [], ".*kernel", QuantSpec(), activation_bits=8)
  with pytest.raises(JaxshrinkError, match="NaN or Inf"):
    ptq(model.apply, params, [batches[0] * np.nan], ".*kernel", QuantSpec(), activation_bits=8)
  bad = jax.tree.map(lambda a: a, params)
  bad["dense2"]["kernel"] = bad["dense2"]["kernel"].at[0, 0].set(jnp.inf)
  with pytest.raises(ValueError, match="`dense2/kernel` holds NaN or Inf"):
    quantize_params(bad, ".*kernel", QuantSpec())
  bad["dense2"]["kernel"] = jnp.ones((128, 10), jnp.int32)
  with pytest.raises(TypeError, match="`dense2/kernel`.*float array"):
    quantize_params(bad, ".*kernel", QuantSpec())


def test_recipe_stage(zoo):
  model, _, _, _ = zoo
  if model.framework != "linen":
    pytest.skip("one recipe run is enough")
  recipe = recipes.parse_recipe({
    "model": "digits-cnn",
    "stages": [{"quantize": {"weight_bits": 8, "activation_bits": 8, "calibration_batches": 2,
                             "overrides": [{"target": "conv1/kernel", "skip": True}]}}],
  })  # fmt: skip
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    result = recipes.run_recipe(recipe, progress=False)
  tree = result.pipeline.tree
  assert not isinstance(tree["conv1"]["kernel"], QArray)
  assert tree["dense1"]["kernel"].act_bits == 8
  assert result.metrics["value"] >= result.metrics["reference_value"] - 0.005
  with pytest.raises(JaxshrinkError, match="Unknown option `bitz`"):
    recipes.parse_recipe({"model": "digits-cnn", "stages": [{"quantize": {"bitz": 4}}]})
  bad = recipes.parse_recipe({"model": "digits-cnn", "stages": [{"quantize": {"method": "magic"}}]})
  with pytest.raises(JaxshrinkError, match="`method` of `quantize` must be one of"):
    recipes.run_recipe(bad, progress=False)
  assert dataclasses.is_dataclass(result.pipeline)
