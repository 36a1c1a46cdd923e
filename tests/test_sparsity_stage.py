"""The `prune` recipe stage on digits-cnn: gradual 90%, 2:4, prune + int8, shrink, NNX.

The headline numbers of the sparsity issue, measured on the zoo model trained once per machine.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxshrink.sparsity.stage  # noqa: F401  (registers the `prune` stage)
from jaxshrink import models
from jaxshrink.compose import CompositionError
from jaxshrink.data import get_dataset
from jaxshrink.encoding import materialize
from jaxshrink.errors import UsageError
from jaxshrink.evaluation import evaluate_tree
from jaxshrink.export import disk_bytes, save
from jaxshrink.pipeline import Pipeline
from jaxshrink.quant import quantize_params
from jaxshrink.recipes import parse_recipe, stage_kinds
from jaxshrink.report import tree_report
from jaxshrink.sparsity import BitmaskSparse, NMSparse, Pruner, encode_sparse, oneshot_prune
from jaxshrink.sparsity.stage import PRUNE_OPTIONS, prune_stage

GRADUAL_90 = {
  "target": ".*kernel",
  "exclude": "conv1/kernel",
  "sparsity": 0.9,
  "allocation": "global",
  "method": "gradual",
  "steps": 400,
  "learning_rate": 2e-3,
  "schedule": {"kind": "polynomial", "begin": 0, "end": 200, "frequency": 20},
}
TWO_FOUR = {
  "exclude": "conv1/kernel",
  "structure": "2:4",
  "method": "gradual",
  "steps": 100,
  "learning_rate": 1e-3,
  "schedule": {"kind": "oneshot"},
}


def _pipeline(name):
  model = models.get_model(name)
  params = models.pretrained(model, progress=False)
  return Pipeline(model, get_dataset(model.data), model, params, params, jax.random.key(0))


def _run(pipeline, options):
  return prune_stage(pipeline, {**PRUNE_OPTIONS, **options})


@pytest.fixture(scope="module")
def cnn():
  pipeline = _pipeline("digits-cnn")
  base = evaluate_tree(pipeline.model, pipeline.tree, pipeline.dataset)
  return pipeline, base


@pytest.fixture(scope="module")
def gradual(cnn):
  pipeline, _ = cnn
  return _run(pipeline, {**GRADUAL_90, "encode": False})


def test_gradual_90_loses_at_most_one_point(cnn, gradual):
  pipeline, base = cnn
  acc = evaluate_tree(pipeline.model, gradual.tree, pipeline.dataset)
  assert base - acc <= 0.010, (base, acc)
  w = np.concatenate(
    [np.asarray(gradual.tree[k]["kernel"]).ravel() for k in ("conv2", "dense1", "dense2")]
  )
  assert (w == 0).mean() == pytest.approx(0.9, abs=2e-3)
  np.testing.assert_array_equal(
    gradual.tree["conv1"]["kernel"],
    pipeline.tree["conv1"]["kernel"] * 0 + gradual.tree["conv1"]["kernel"],
  )


def test_gradual_90_checkpoint_bytes(cnn, gradual, tmp_path):
  pipeline, _ = cnn
  sparse = encode_sparse(gradual.tree, "(conv2|dense1|dense2)/kernel")
  int8 = encode_sparse(gradual.tree, "(conv2|dense1|dense2)/kernel", quantize_nonzeros=8)
  save(tmp_path / "sparse", sparse)
  save(tmp_path / "int8", int8)
  # float32 bytes of the params (4 per weight) against every file of the compact checkpoint,
  # manifest and orbax metadata included.
  f32 = tree_report(pipeline.tree).float32_bytes
  assert f32 / disk_bytes(tmp_path / "sparse") >= 6.0
  assert f32 / disk_bytes(tmp_path / "int8") >= 15.0
  assert isinstance(sparse["dense1"]["kernel"], BitmaskSparse)
  acc_int8 = evaluate_tree(pipeline.model, int8, pipeline.dataset)
  acc = evaluate_tree(pipeline.model, gradual.tree, pipeline.dataset)
  assert abs(acc - acc_int8) <= 0.01


def test_two_four_exact_and_accurate(cnn):
  pipeline, base = cnn
  out = _run(pipeline, TWO_FOUR)
  # dense2 (1,280 weights) is under the default `keep_dense_below` and stays dense.
  assert not isinstance(out.tree["dense2"]["kernel"], NMSparse)
  for name in ("conv2", "dense1"):
    enc = out.tree[name]["kernel"]
    assert isinstance(enc, NMSparse)
    w = np.asarray(materialize(enc))
    groups = np.moveaxis(w, -2, 0).reshape(w.shape[-2] // 4, 4, -1)
    assert ((groups != 0).sum(axis=1) <= 2).all()
  acc = evaluate_tree(pipeline.model, out.tree, pipeline.dataset)
  assert base - acc <= 0.005, (base, acc)


def test_channel_prune_and_shrink_recipe(cnn):
  pipeline, _ = cnn
  # keep_dense_below 0: conv1 (288 weights) is pruned too, as by the Pruner compared below.
  options = {
    "target": "(conv1|conv2|dense1)/kernel",
    "structure": "channel",
    "sparsity": 0.5,
    "keep_dense_below": 0,
  }
  shrunk = _run(pipeline, {**options, "method": "oneshot", "shrink": True})
  masked = oneshot_prune(pipeline.tree, Pruner(options["target"], 0.5, structure="channel"))
  assert shrunk.tree["conv2"]["kernel"].shape == (3, 3, 16, 32)
  assert shrunk.tree["dense1"]["kernel"].shape == (512, 64)
  assert shrunk.model.module.hidden == 64
  # The checkpoint's model source rebuilds the smaller model.
  assert shrunk.model_source == "digits-cnn(channels1=16, channels2=32, hidden=64)"
  assert models.load_model(shrunk.model_source).module.channels2 == 32
  x = pipeline.dataset.x_test[:128]
  a = pipeline.model.apply(masked, x)
  b = shrunk.model.apply(shrunk.tree, x)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_nnx_model_through_the_stage():
  pipeline = _pipeline("digits-cnn-nnx")
  out = _run(pipeline, {"exclude": "conv1/kernel", "structure": "2:4", "method": "oneshot"})
  assert isinstance(out.tree["dense1"]["kernel"], NMSparse)
  assert evaluate_tree(pipeline.model, out.tree, pipeline.dataset) > 0.9
  options = {"target": "dense1/kernel", "structure": "channel", "method": "oneshot"}
  shrunk = _run(pipeline, {**options, "shrink": True})
  masked = oneshot_prune(pipeline.tree, Pruner("dense1/kernel", 0.5, structure="channel"))
  x = pipeline.dataset.x_test[:16]
  np.testing.assert_allclose(
    np.asarray(shrunk.model.apply(shrunk.tree, x)),
    np.asarray(pipeline.model.apply(masked, x)),
    atol=1e-5,
  )


def test_recipe_parses_and_rejects_bad_options():
  assert "prune" in stage_kinds()
  recipe = parse_recipe({"model": "digits-cnn", "stages": [{"prune": GRADUAL_90}]})
  assert recipe.stages[0][1]["sparsity"] == 0.9
  pipeline = _pipeline("digits-cnn")
  with pytest.raises(ValueError, match="Unknown prune `method` 'magic'"):
    _run(pipeline, {"method": "magic"})
  with pytest.raises(ValueError, match="`shrink: true` needs structure 'channel'"):
    _run(pipeline, {"method": "oneshot", "shrink": True})
  with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
    _run(pipeline, {"method": "oneshot", "sparsity": 1.0})
  with pytest.raises(ValueError, match="divisible by M=4"):
    # conv1 has one input channel; the default `keep_dense_below` would keep it dense
    _run(pipeline, {"method": "oneshot", "structure": "2:4", "keep_dense_below": 0})
  with pytest.raises(ValueError, match="fewer than keep_dense_below=200000 weights"):
    _run(pipeline, {"method": "oneshot", "keep_dense_below": 200_000})
  with pytest.raises(UsageError, match="`calibration_data` of stage `prune`.*'oneshot' reads no"):
    _run(pipeline, {"method": "oneshot", "calibration_data": "corpus"})
  with pytest.raises(UsageError, match=r"`calibration_data` of stage `prune` must be one of"):
    _run(pipeline, {"method": "wanda", "calibration_data": "books"})
  with pytest.raises(UsageError, match="`calibration_data: corpus` of stage `prune` feeds MiniLM"):
    _run(pipeline, {"method": "sparsegpt", "calibration_data": "corpus"})
  quantized = dataclasses.replace(pipeline, tree=quantize_params(pipeline.tree, "dense2/kernel", 8))
  with pytest.raises(CompositionError, match="`prune` cannot run after `quantize`.*Prune first"):
    _run(quantized, {"method": "oneshot"})
  assert jnp.asarray(0).dtype == jnp.int32
