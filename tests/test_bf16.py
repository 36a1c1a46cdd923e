"""A bfloat16 model end to end: every technique keeps bf16 compute (f32 accumulation), the
serving modes run bf16 matmuls, and reports count the saving against the model's own dtype."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxshrink as js
from jaxshrink import recipes, serving
from jaxshrink.models import get_model
from jaxshrink.quant import quantized_apply

TARGET = ".*kernel"
TECHNIQUES = [
  "int8",
  "int4-g16",
  "w8a8",
  "gptq-int4",
  "awq-int4",
  "wanda",
  "sparsegpt",
  "2:4",
  "lowrank",
]
# A dot_general whose two operands are float32 (StableHLO text: `(tensor<..xf32>, tensor<..xf32>)`).
F32_DOT = re.compile(r"dot_general.*\(tensor<[^>]*xf32>, tensor<[^>]*xf32>\)")


@pytest.fixture(scope="module")
def setup():
  pipeline = recipes.prepare(
    recipes.parse_recipe({"model": "digits-mlp", "stages": []}), progress=False
  )
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), pipeline.float_params)
  ds = pipeline.dataset
  x_test = jnp.asarray(ds.x_test, jnp.bfloat16)
  calib = [jnp.asarray(ds.x_train[i : i + 128], jnp.bfloat16) for i in range(0, 512, 128)]
  return get_model("digits-mlp").apply, params, x_test, np.asarray(ds.y_test), calib


def _accuracy(logits, labels) -> float:
  return float(np.mean(np.argmax(np.asarray(logits, np.float32), -1) == labels))


def _compressed(setup):
  apply, params, _, _, calib = setup
  int8 = js.QuantSpec(bits=8)
  int4 = js.QuantSpec(bits=4, group_size=16)
  sparse = js.oneshot_prune(params, js.Pruner(TARGET, structure="2:4"))
  return {
    "int8": js.quantize_params(params, TARGET, int8),
    "int4-g16": js.quantize_params(params, TARGET, int4),
    "w8a8": js.ptq(apply, params, calib, TARGET, js.LayerQuant(int8, activation_bits=8)),
    "gptq-int4": js.gptq(apply, params, calib, TARGET, int4),
    "awq-int4": js.awq(apply, params, calib, TARGET, int4),
    "wanda": js.wanda(apply, params, calib, js.Pruner(TARGET, 0.5)),
    "sparsegpt": js.sparsegpt(apply, params, calib, js.Pruner(TARGET, 0.5)),
    "2:4": js.sparsity.encode_sparse(sparse, TARGET, structure="2:4"),
    "lowrank": js.factorize(params, "dense1/kernel", rank=16),
  }


@pytest.fixture(scope="module")
def trees(setup):
  return _compressed(setup)


def test_the_bf16_model_computes_in_bf16(setup):
  apply, params, x_test, labels, _ = setup
  out = jax.jit(apply)(params, x_test)
  assert out.dtype == jnp.bfloat16 and _accuracy(out, labels) > 0.9


@pytest.mark.parametrize("name", TECHNIQUES)
def test_every_technique_keeps_bf16_and_accuracy(setup, trees, name):
  apply, params, x_test, labels, _ = setup
  base = _accuracy(jax.jit(apply)(params, x_test), labels)
  for mode in serving.modes_for(trees[name]):
    served = serving.serve(apply, trees[name], mode)
    out = served(x_test)
    assert out.dtype == jnp.bfloat16, (name, mode)
    drop = 0.05 if name in ("2:4", "lowrank", "wanda", "sparsegpt") else 0.02
    assert _accuracy(out, labels) >= base - drop, (name, mode)


@pytest.mark.parametrize("name", ["int8", "int4-g16", "2:4", "lowrank"])
def test_serving_runs_no_float32_matmul_on_a_bf16_model(setup, trees, name):
  apply, _, x_test, _, _ = setup
  for mode in serving.modes_for(trees[name]):
    served = serving.serve(apply, trees[name], mode)
    text = jax.jit(served.apply).lower(served.params, x_test[:8]).as_text()
    assert "dot_general" in text
    assert not F32_DOT.search(text), (name, mode)


def test_w8a8_matmuls_are_int8_on_a_bf16_model(setup, trees):
  apply, _, x_test, _, _ = setup
  text = jax.jit(quantized_apply(apply)).lower(trees["w8a8"], x_test[:8]).as_text()
  assert re.search(r"dot_general.*\(tensor<[^>]*xi8>, tensor<[^>]*xi8>\)", text)
  assert not F32_DOT.search(text)


def test_reports_count_against_the_models_own_dtype(trees):
  report = js.tree_report(trees["int8"])
  assert report.native_ratio == pytest.approx(report.ratio / 2, rel=1e-6)
  assert 1.8 < report.native_ratio < 2.0  # int8 of bf16 kernels saves 2x, less the scales
  assert 3.6 < report.ratio < 4.0  # against float32, the common yardstick


def test_decoded_leaves_keep_the_models_dtype(trees):
  for name, tree in trees.items():
    for leaf in jax.tree.leaves(js.materialize(tree)):
      assert leaf.dtype == jnp.bfloat16, name
