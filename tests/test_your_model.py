"""Models as users write them (not in the zoo): an nnx CNN with BatchNorm, a linen model with
`batch_stats`, a scanned nnx decoder. Each goes through the techniques in its own form, is
saved and loaded with every collection, served in bf16 and integer mode, and a recipe with a
user factory, a user metric and .npz data runs from `jaxshrink compress` to `jaxshrink eval`."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

import jaxshrink as js
from jaxshrink.cli import main
from jaxshrink.encoding import is_encoding
from jaxshrink.errors import UsageError
from jaxshrink.model import (
  Compressed,
  Linen,
  NnxGraph,
  accepts_models,
  as_functional,
  as_tree,
  rebuild,
)
from jaxshrink.quant import QuantSpec
from jaxshrink.sparsity import Pruner

FIXTURES = Path(__file__).parent / "fixtures"

ptq, gptq, quantize_params = js.ptq, js.gptq, js.quantize_params
sparsegpt, oneshot_prune = js.sparsegpt, js.oneshot_prune


@pytest.fixture(scope="module")
def um():
  import sys

  sys.path.insert(0, str(FIXTURES))
  try:
    import user_models
  finally:
    sys.path.remove(str(FIXTURES))
  return user_models


@pytest.fixture(scope="module")
def data(um):
  return um.data()


@pytest.fixture(scope="module")
def cnn(um):
  return um.nnx_cnn()


@pytest.fixture(scope="module")
def float_out(cnn, data):
  module = nnx.clone(cnn)
  module.eval()
  return module(data["x_test"])


def _equal(a, b):
  return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))


def _error(out, ref):
  return float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))


# --- the functional form ---


def test_nnx_tree_holds_every_collection_and_selects_like_linen(cnn, data, float_out):
  apply, tree = as_functional(cnn)
  assert sorted(tree) == ["batch_stats", "params"]
  assert js.select(tree, ".*kernel") == ["conv1/kernel", "head/kernel"]
  np.testing.assert_array_equal(tree["batch_stats"]["bn"]["mean"], cnn.bn.mean[...])
  # eval mode (running averages, no dropout), exactly the module's own eval output
  np.testing.assert_array_equal(jax.jit(apply)(tree, data["x_test"]), float_out)
  assert "rngs" not in js.flatten(tree) and not any("rngs" in p for p in js.flatten(tree))


def test_linen_pair_and_apply_pass_through(um):
  module, variables = um.linen_mlp()
  for model in (Linen(module, variables), (module, variables)):
    apply, tree = as_functional(model)
    assert apply == module.apply and tree is variables
  fn = lambda p, x: x  # noqa: E731
  assert as_functional(fn, {"w": 1}) == (fn, {"w": 1})
  assert as_tree({"w": 1}) == {"w": 1}


def test_not_a_model_is_a_type_error():
  with pytest.raises(TypeError, match=r"nnx module.*Linen.*got int"):
    as_functional(3)
  with pytest.raises(ValueError, match="`result`"):
    accepts_models(js.ptq, result="list")


def test_a_tree_missing_a_variable_names_it(cnn):
  graph, tree = NnxGraph.split(cnn)
  del tree["batch_stats"]
  with pytest.raises(KeyError, match="batch_stats/bn/mean"):
    graph.apply(tree, jnp.ones((1, 8, 8, 1)))


# --- techniques take and give back the user's form ---


def test_rtn_on_an_nnx_module_gives_a_callable_compressed_module(cnn, data, float_out):
  cmodel = quantize_params(cnn, ".*kernel", QuantSpec(bits=8))
  assert isinstance(cmodel, Compressed) and isinstance(cmodel, nnx.Module)
  assert cmodel.mode == "integer"
  assert cmodel.tree["params"]["conv1"]["kernel"].describe().startswith("int8")
  assert _equal(cmodel.tree["batch_stats"], as_tree(cnn)["batch_stats"])
  assert _error(cmodel(data["x_test"]), float_out) < 0.02
  dense = cmodel.dense()
  assert type(dense) is type(cnn)
  np.testing.assert_array_equal(dense.bn.var[...], cnn.bn.var[...])


@pytest.mark.parametrize("form", ["omitted", "none", "explicit"])
def test_w8a8_ptq_on_an_nnx_module(cnn, data, float_out, form):
  batches = [data["x_train"][:64], data["x_train"][64:]]
  rule, spec = ".*kernel", QuantSpec(bits=8)
  if form == "omitted":
    cmodel = ptq(cnn, batches, rule, spec, activation_bits=8)
  elif form == "none":
    cmodel = ptq(cnn, None, batches, rule, spec, activation_bits=8)
  else:
    cmodel = ptq(cnn, as_tree(cnn), batches, rule, spec, activation_bits=8)
  assert isinstance(cmodel, Compressed)
  assert cmodel.tree["params"]["head"]["kernel"].describe().startswith("int8")
  x = data["x_test"]
  assert _error(cmodel(x), float_out) < 0.03
  assert _error(cmodel.with_mode("bfloat16")(x), float_out) < 0.03
  assert _error(js.serving.serve(cmodel, "bfloat16")(x), float_out) < 0.03


def test_gptq_int4_and_24_int4_on_a_linen_pair(um, data):
  module, variables = um.linen_mlp()
  model, x = Linen(module, variables), data["x_test"]
  reference = module.apply(variables, x)
  batches = [data["x_train"]]
  q4 = gptq(model, batches, ".*kernel", QuantSpec(bits=4, group_size=8))
  assert isinstance(q4, Linen) and q4.module is module
  assert _equal(q4.variables["batch_stats"], variables["batch_stats"])
  for mode in ("integer", "bfloat16"):
    assert _error(js.serving.serve(q4, mode)(x), reference) < 0.2
  pruned = sparsegpt(model, batches, Pruner(".*kernel", sparsity=0.5, structure="2:4"))
  assert isinstance(pruned, Linen)
  kernel = pruned.variables["params"]["Dense_0"]["kernel"]
  assert float(jnp.mean(kernel == 0)) == 0.5
  q = gptq(pruned, batches, ".*kernel", QuantSpec(bits=4, group_size=8))
  kernel = q.variables["params"]["Dense_0"]["kernel"]
  assert float(jnp.mean(kernel.materialize() == 0)) >= 0.5


def test_pruning_an_nnx_module_gives_the_users_class(cnn):
  pruned = oneshot_prune(cnn, Pruner("head/kernel", sparsity=0.5, structure="2:4"))
  assert type(pruned) is type(cnn)
  assert float(jnp.mean(pruned.head.kernel[...] == 0)) == 0.5
  np.testing.assert_array_equal(pruned.bn.mean[...], cnn.bn.mean[...])
  assert cnn.head.kernel[...].min() != 0  # the user's module is untouched


def test_cast_and_factorize_take_the_module(cnn, data, float_out):
  cast = js.cast_params(cnn, ".*kernel")
  assert isinstance(cast, Compressed)
  assert _error(cast(data["x_test"]), float_out) < 0.01
  low = js.factorize(cnn, "head/kernel", rank=2)
  assert isinstance(low, Compressed) and low(data["x_test"]).shape == (64, 4)
  dense = cast.dense()
  assert type(dense) is type(cnn)
  assert type(js.cast_params(dense, "head/kernel")) is Compressed


def test_scanned_decoder_through_w8a8_gptq_and_24(um):
  model, tokens = um.scanned_decoder(), um.token_data()
  apply, tree = as_functional(model)
  x, batches = tokens["x_test"], [tokens["x_train"]]
  assert tree["params"]["blocks"]["up"]["kernel"].shape == (3, 16, 32)
  reference = apply(tree, x)
  w8a8 = ptq(model, batches, ".*kernel", QuantSpec(bits=8), activation_bits=8)
  assert _error(w8a8(x), reference) < 0.05
  assert _error(w8a8.with_mode("bfloat16")(x), reference) < 0.05
  int4 = gptq(model, batches, ".*kernel", QuantSpec(bits=4, group_size=8))
  assert _error(int4(x), reference) < 0.5
  pruned = sparsegpt(model, batches, Pruner(".*kernel", sparsity=0.5, structure="2:4"))
  assert type(pruned) is type(model)
  both = gptq(pruned, batches, ".*kernel", QuantSpec(bits=4, group_size=8))
  assert isinstance(both, Compressed) and both(x).shape == (32, 16, 32)


# --- save / load ---


def test_save_load_an_nnx_compressed_module(cnn, data, tmp_path):
  cmodel = quantize_params(cnn, ".*kernel", QuantSpec(bits=8))
  js.save(tmp_path / "c", cmodel)
  paths = [leaf["path"] for leaf in js.read_manifest(tmp_path / "c")["leaves"]]
  assert "batch_stats/bn/mean" in paths and "params/conv1/kernel" in paths
  back = js.load(tmp_path / "c", like=cnn)
  assert isinstance(back, Compressed)
  np.testing.assert_array_equal(back(data["x_test"]), cmodel(data["x_test"]))
  assert _equal(back.tree, cmodel.tree)
  dense = js.load(tmp_path / "c", like=cnn, dense=True)
  assert type(dense) is type(cnn)
  np.testing.assert_array_equal(dense.bn.mean[...], cnn.bn.mean[...])
  plain = js.load(tmp_path / "c")  # no `like`: the tree
  assert sorted(plain) == ["batch_stats", "params"]


def test_save_load_a_float_nnx_module_with_params_only(tmp_path):
  model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
  js.save(tmp_path / "f", model)
  paths = [leaf["path"] for leaf in js.read_manifest(tmp_path / "f")["leaves"]]
  assert paths == ["bias", "kernel"]  # a params-only tree is stored without the wrapper
  back = js.load(tmp_path / "f", like=model)
  assert type(back) is nnx.Linear
  np.testing.assert_array_equal(back.kernel[...], model.kernel[...])


def test_save_load_a_linen_pair_keeps_batch_stats(um, data, tmp_path):
  module, variables = um.linen_mlp()
  q = quantize_params(Linen(module, variables), ".*kernel", QuantSpec(bits=8))
  js.save(tmp_path / "l", q)
  back = js.load(tmp_path / "l", like=(module, variables))
  assert isinstance(back, Linen)
  assert _equal(back.variables["batch_stats"], variables["batch_stats"])
  x = data["x_test"]
  np.testing.assert_array_equal(js.serving.serve(back, "integer")(x), js.serving.serve(q)(x))


def test_rebuild_of_a_plain_tree_is_the_tree():
  assert rebuild(lambda p, x: x, {"w": 1}) == {"w": 1}


# --- recipes and the CLI ---


def _write(path: Path, recipe: dict) -> Path:
  path.write_text(yaml.safe_dump(recipe))
  return path


@pytest.fixture()
def user_code(monkeypatch, um):
  monkeypatch.syspath_prepend(str(FIXTURES))
  return um


def _run(capsys, *argv):
  code = main(list(argv))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_recipe_with_user_factory_metric_and_npz_then_eval(user_code, capsys, tmp_path):
  npz = tmp_path / "data.npz"
  np.savez(npz, **user_code.data())
  recipe = _write(tmp_path / "r.yaml", {
    "model": "user_models:nnx_cnn", "data": str(npz), "metric": "user_models:agreement",
    "stages": [{"quantize": {"weight_bits": 8, "activation_bits": 8}}],
    "export": {"serving": "integer"},
  })  # fmt: skip
  out = tmp_path / "ckpt"
  code, stdout, err = _run(capsys, "compress", str(recipe), "--out", str(out), "--json")
  assert code == 0, err
  summary = json.loads(stdout)
  assert summary["metric"] == "user_models:agreement" and summary["reference_value"] == 1.0
  assert summary["value"] > 0.9
  manifest = js.read_manifest(out)
  assert manifest["model"] == "user_models:nnx_cnn"
  assert manifest["metrics"]["higher_is_better"] is True
  assert "batch_stats/bn/var" in [leaf["path"] for leaf in manifest["leaves"]]
  for mode in ("integer", "bfloat16"):
    argv = ["eval", str(out), "--model", "user_models:nnx_cnn", "--data", str(npz),
            "--metric", "user_models:agreement", "--serving", mode, "--json"]  # fmt: skip
    code, stdout, err = _run(capsys, *argv)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["metric"] == "user_models:agreement" and result["serving_mode"] == mode
    assert result["value"] == pytest.approx(summary["value"], abs=0.02)
    assert result["reference_value"] == 1.0
  # The checkpoint names the metric as code: never imported from it.
  code, _, err = _run(capsys, "eval", str(out), "--model", "user_models:nnx_cnn",
                      "--data", str(npz))  # fmt: skip
  assert code == 2 and "--metric pkg.mod:fn" in err
  # ... nor the model.
  code, _, err = _run(capsys, "eval", str(out), "--data", str(npz), "--metric", "accuracy")
  assert code == 1 and "never code to import" in err


def test_recipe_with_a_linen_pair_24_int4_and_a_npy_directory(user_code, capsys, tmp_path):
  directory = tmp_path / "arrays"
  directory.mkdir()
  for name, array in user_code.data().items():
    np.save(directory / f"{name}.npy", array)
  recipe = _write(tmp_path / "r.yaml", {
    "model": "user_models:linen_mlp", "data": str(directory),
    "stages": [{"prune": {"method": "sparsegpt", "structure": "2:4", "keep_dense_below": 0,
                          "quantize_nonzeros": 4}}],
    "export": {"serving": None},
  })  # fmt: skip
  out = tmp_path / "ckpt"
  code, stdout, err = _run(capsys, "compress", str(recipe), "--out", str(out), "--json")
  assert code == 0, err
  assert json.loads(stdout)["metric"] == "accuracy"  # the data's default
  code, stdout, err = _run(capsys, "eval", str(out), "--model", "user_models:linen_mlp",
                           "--data", str(directory), "--json")  # fmt: skip
  assert code == 0, err
  assert json.loads(stdout)["metric"] == "accuracy"


def test_training_fields_are_needed_only_by_stages_that_train(user_code, capsys, tmp_path):
  base = {"model": "user_models:linen_mlp", "data": "user_models:data", "export": {"serving": None}}
  qat = {**base, "stages": [{"quantize": {"method": "qat", "steps": 2}}]}
  code, _, err = _run(capsys, "compress", str(_write(tmp_path / "a.yaml", qat)),
                      "--out", str(tmp_path / "a"))  # fmt: skip
  assert code == 2
  assert "stage 1 (`quantize`, method 'qat')" in err and "training: {batch_size: ...}" in err
  recipe = _write(tmp_path / "b.yaml", {**qat, "training": {"batch_size": 32}})
  code, _, err = _run(capsys, "compress", str(recipe), "--out", str(tmp_path / "b"))
  assert code == 0, err


def test_calibration_never_falls_back_on_the_test_split(user_code, capsys, tmp_path):
  arrays = {k: v for k, v in user_code.data().items() if k.endswith("_test")}
  np.savez(tmp_path / "test_only.npz", **arrays)
  recipe = _write(tmp_path / "r.yaml", {
    "model": "user_models:nnx_cnn", "data": str(tmp_path / "test_only.npz"),
    "stages": [{"quantize": {"method": "gptq", "weight_bits": 4, "group_size": 8}}],
  })  # fmt: skip
  code, _, err = _run(capsys, "compress", str(recipe), "--out", str(tmp_path / "o"))
  assert code == 2 and "has none. Give `x_train`" in err


def test_recipe_refusals(user_code):
  from jaxshrink import recipes

  def prepare(**raw):
    return recipes.prepare(recipes.parse_recipe({"model": "user_models:nnx_cnn", **raw}))

  with pytest.raises(UsageError, match="`data` is required"):
    prepare()
  with pytest.raises(UsageError, match="does not say its direction"):
    prepare(data="user_models:data", metric="user_models:data")
  with pytest.raises(UsageError, match="unknown metric 'f1'"):
    prepare(data="user_models:data", metric="f1")
  with pytest.raises(UsageError, match="Unknown field `steps`"):
    prepare(data="user_models:data", training={"steps": 3})
  with pytest.raises(UsageError, match="zoo model with its own"):
    recipes.prepare(recipes.parse_recipe({"model": "digits-mlp", "training": {"batch_size": 8}}))
  pipeline = prepare(data="user_models:data",
                     metric={"fn": "user_models:data", "higher_is_better": False})  # fmt: skip
  assert pipeline.model.higher_is_better is False and pipeline.model.metric_fn is not None
  with pytest.raises(UsageError, match="`pad_id` in recipe must be the padding token id"):
    prepare(data="user_models:data", pad_id=-1)
  with pytest.raises(UsageError, match=r"'digits-mlp' is a zoo model with its own \(None\)"):
    recipes.prepare(recipes.parse_recipe({"model": "digits-mlp", "pad_id": 0}))
  assert prepare(data="user_models:data").model.pad_id is None
  assert prepare(data="user_models:data", pad_id=3).model.pad_id == 3  # calibration skips id 3


def test_user_model_forms(user_code):
  from jaxshrink.models.base import user_model

  module, variables = user_code.linen_mlp()
  model = user_model((module.apply, variables), name="pair")
  assert model.framework == "user" and model.unset == ("train_steps", "learning_rate", "batch_size")
  assert model.init(None) is variables
  with pytest.raises(TypeError, match=r"'three' must return \(or be\) an nnx.Module.*got int"):
    user_model(3, name="three")
  with pytest.raises(ValueError, match="unknown training field"):
    user_model(user_code.nnx_cnn(), name="cnn", training={"epochs": 1})


def test_encodings_in_results(cnn):
  cmodel = quantize_params(cnn, ".*kernel", QuantSpec(bits=8))
  encoded = [p for p, leaf in js.flatten(cmodel.tree).items() if is_encoding(leaf)]
  assert encoded == ["conv1/kernel", "head/kernel"]


def test_recipe_rtn_on_a_scanned_decoder_gives_each_layer_its_scales(user_code, capsys, tmp_path):
  recipe = _write(tmp_path / "r.yaml", {
    "model": "user_models:scanned_decoder", "data": "user_models:token_data",
    "metric": {"fn": "user_models:agreement", "higher_is_better": True},
    "stages": [{"quantize": {"weight_bits": 4, "group_size": 8}}],
    "export": {"serving": None},
  })  # fmt: skip
  out = tmp_path / "ckpt"
  code, _, err = _run(capsys, "compress", str(recipe), "--out", str(out), "--json")
  assert code == 0, err
  kernel = js.load(out)["blocks"]["up"]["kernel"]  # params only: stored without the wrapper
  assert kernel.layers == 3 and kernel.scale.shape[0] == 3
