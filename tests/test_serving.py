"""Serving modes: each one runs every kind of compressed tree with the tree's own numerics,
the recipe records the fastest, and `eval` runs and times the recorded (or chosen) mode."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshrink import UsageError, evaluation, recipes, serving
from jaxshrink.cli import main
from jaxshrink.encoding import materialize
from jaxshrink.quant import quantized_apply

NO_TIMING = {"evaluate": False, "serving": None}
STAGES = {
  "w8a8": [{"quantize": {"weight_bits": 8, "activation_bits": 8}}],
  "int4-g16": [{"quantize": {"weight_bits": 4, "group_size": 16, "target": "dense.*kernel"}}],
  "sparse": [{"prune": {"sparsity": 0.5, "method": "oneshot"}}],
  "lowrank": [{"factorize": {"rank": 4, "target": "dense1/kernel"}}],
  "bf16-cast": [{"cast": {"target": ".*kernel"}}],
}


def _run(stages, export=NO_TIMING):
  recipe = recipes.parse_recipe({"model": "digits-cnn", "stages": stages, "export": export})
  return recipes.run_recipe(recipe, progress=False)


@pytest.fixture(scope="module")
def trees():
  return {name: _run(stages).pipeline for name, stages in STAGES.items()}


@pytest.fixture(scope="module")
def batch(trees):
  return (evaluation.timing_batch(trees["w8a8"].dataset, 32),)


@pytest.mark.parametrize("name", list(STAGES))
def test_every_mode_runs_every_tree_with_its_numerics(trees, batch, name):
  pipeline = trees[name]
  apply = pipeline.model.apply
  reference = jax.jit(quantized_apply(apply))(pipeline.tree, *batch)  # the tree's own numerics
  decoded = jax.jit(apply)(materialize(pipeline.tree), *batch)
  assert serving.modes_for(pipeline.tree) == (
    serving.MODES if name == "lowrank" else ("integer", "bfloat16", "decode-once")
  )
  for mode in serving.modes_for(pipeline.tree):
    out = serving.serve(apply, pipeline.tree, mode)(*batch)
    assert out.shape == reference.shape and out.dtype == reference.dtype
    if mode == "integer":
      np.testing.assert_array_equal(out, reference)
    elif mode == "bfloat16":  # bf16 operands: about 3 significant digits
      scale = float(jnp.max(jnp.abs(decoded)))
      assert float(jnp.max(jnp.abs(out - decoded))) < 0.03 * scale
    else:  # decode-once and factored: the decoded float weights
      np.testing.assert_allclose(out, decoded, rtol=1e-4, atol=1e-4 * float(jnp.abs(decoded).max()))


def test_decode_once_holds_dense_float_and_integer_keeps_codes(trees):
  tree = trees["w8a8"].tree
  once = serving.serve(trees["w8a8"].model.apply, tree, "decode-once")
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(once.params))
  integer = serving.serve(trees["w8a8"].model.apply, tree, "integer")
  assert integer.params is tree


def test_bfloat16_runs_kernel_matmuls_in_bf16(trees, batch):
  pipeline = trees["w8a8"]
  apply = serving.bfloat16_apply(pipeline.model.apply)
  text = jax.jit(apply).lower(pipeline.tree, *batch).as_text()
  assert "bf16" in text and ("dot_general" in text or "convolution" in text)


def test_measure_times_each_mode_against_float(trees, batch):
  pipeline = trees["int4-g16"]
  timing = serving.measure(
    pipeline.model.apply, pipeline.tree, pipeline.float_params, batch, repeats=2
  )
  assert set(timing.time_vs_float) == {"integer", "bfloat16", "decode-once"}
  assert set(timing.seconds_per_batch) == {"float", *timing.time_vs_float}
  for mode, ratio in timing.time_vs_float.items():
    expected = timing.seconds_per_batch[mode] / timing.seconds_per_batch["float"]
    assert ratio == pytest.approx(expected, rel=1e-3)
  assert timing.fastest() == min(timing.time_vs_float, key=timing.time_vs_float.get)
  assert timing.batch_shape == tuple(batch[0].shape)


def test_unknown_or_inapplicable_mode_is_a_usage_error(trees):
  with pytest.raises(UsageError, match=r"expected one of integer, bfloat16.*got 'int8'"):
    serving.serve(trees["w8a8"].model.apply, trees["w8a8"].tree, "int8")
  with pytest.raises(UsageError, match="holds none"):
    serving.serve(trees["w8a8"].model.apply, trees["w8a8"].tree, "factored")
  with pytest.raises(UsageError, match=r"`export.serving`.*got 'fast'.*`auto`"):
    recipes.parse_recipe({"model": "digits-cnn", "export": {"serving": "fast"}})


def test_recipe_records_the_fastest_mode():
  result = _run(STAGES["w8a8"], export={"evaluate": False})  # default: serving auto
  recorded = result.metrics["serving"]
  ratios = recorded["time_vs_float_by_mode"]
  assert set(ratios) == {"integer", "bfloat16", "decode-once"}
  assert recorded["serving_mode"] == min(ratios, key=ratios.get)
  assert recorded["time_vs_float"] == ratios[recorded["serving_mode"]]
  assert recorded["batch_shape"] == [64, 8, 8, 1]
  assert recorded["backend"] == jax.default_backend()
  single = recorded["single"]  # `auto` also times one request
  assert single["batch_shape"] == [1, 8, 8, 1]
  assert single["serving_mode"] == min(single["time_vs_float_by_mode"],
                                       key=single["time_vs_float_by_mode"].get)  # fmt: skip
  assert serving.recorded_mode(recorded, 1) == single["serving_mode"]
  assert serving.recorded_mode(recorded, 64) == recorded["serving_mode"]


def test_recorded_mode_picks_by_rows_and_checks_what_it_reads():
  recorded = {"serving_mode": "bfloat16", "single": {"serving_mode": "decode-once"}}
  rows = {r: serving.recorded_mode(recorded, r) for r in (1, serving.SINGLE_MAX_ROWS, 9, 64)}
  assert rows == {1: "decode-once", serving.SINGLE_MAX_ROWS: "decode-once", 9: "bfloat16",
                  64: "bfloat16"}  # fmt: skip
  assert serving.recorded_mode({"serving_mode": "integer"}, 1) == "integer"  # no `single`
  bad = {"serving_mode": "integer", "single": {"serving_mode": "os.system"}}
  with pytest.raises(UsageError, match=r"`metrics.serving.single.serving_mode` recorded in `d`"):
    serving.recorded_mode(bad, 1, source="`d`")
  assert serving.recorded_mode(bad, 64) == "integer"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp("serving")
  recipe = directory / "recipe.yaml"
  recipe.write_text(
    "model: digits-cnn\nstages:\n  - quantize: {weight_bits: 8, activation_bits: 8}\n"
    "export: {serving: integer}\n"
  )
  out = directory / "ckpt"
  assert main(["compress", str(recipe), "--out", str(out)]) == 0
  return out


def _eval(capsys, *argv):
  try:
    code = main(["eval", *argv])
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def test_eval_json_runs_and_times_the_recorded_mode(checkpoint, capsys):
  manifest = json.loads((checkpoint / "manifest.json").read_text())
  assert manifest["metrics"]["serving"]["serving_mode"] == "integer"
  code, out, _ = _eval(capsys, str(checkpoint), "--json", "--batch-size", "16")
  assert code == 0
  payload = json.loads(out)
  assert payload["serving_mode"] == "integer"
  assert payload["batch_shape"] == [16, 8, 8, 1]
  assert payload["seconds_per_batch"] > 0 and payload["float_seconds_per_batch"] > 0
  assert payload["time_vs_float"] == pytest.approx(
    payload["seconds_per_batch"] / payload["float_seconds_per_batch"], rel=1e-3
  )
  assert payload["value"] == pytest.approx(manifest["metrics"]["value"])  # same numerics


def test_eval_serving_flag_overrides_and_is_checked(checkpoint, capsys):
  code, out, _ = _eval(capsys, str(checkpoint), "--serving", "decode-once")
  assert code == 0
  assert "serving mode decode-once" in out and "the float model's time" in out
  code, _, err = _eval(capsys, str(checkpoint), "--serving", "fp4")
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert "`--serving`: expected one of" in err


def test_eval_refuses_an_unknown_recorded_mode(checkpoint, capsys, tmp_path):
  import shutil

  copy = tmp_path / "ckpt"
  shutil.copytree(checkpoint, copy)
  manifest = json.loads((copy / "manifest.json").read_text())
  manifest["metrics"]["serving"]["serving_mode"] = "os.system"
  (copy / "manifest.json").write_text(json.dumps(manifest))
  code, _, err = _eval(capsys, str(copy))
  assert code in (1, 2) and len(err.strip().splitlines()) == 1
  assert "os.system" in err or "manifest" in err


def test_eval_of_one_row_runs_the_recorded_single_request_mode(checkpoint, capsys, tmp_path):
  import shutil

  copy = tmp_path / "ckpt"
  shutil.copytree(checkpoint, copy)
  manifest = json.loads((copy / "manifest.json").read_text())
  recorded = manifest["metrics"]["serving"]
  recorded["single"] = {**recorded, "serving_mode": "decode-once", "batch_shape": [1, 8, 8, 1]}
  (copy / "manifest.json").write_text(json.dumps(manifest))
  for rows, mode in ((1, "decode-once"), (16, "integer")):
    code, out, _ = _eval(capsys, str(copy), "--json", "--batch-size", str(rows))
    assert code == 0 and json.loads(out)["serving_mode"] == mode
  assert main(["inspect", str(copy)]) == 0
  out = " ".join(capsys.readouterr().out.split())
  assert "one request: decode-once (" in out and "batch (1, 8, 8, 1)" in out


def test_inspect_shows_the_recorded_mode(checkpoint, capsys):
  assert main(["inspect", str(checkpoint)]) == 0
  out = " ".join(capsys.readouterr().out.split())
  assert "serving mode: integer (" in out and "the float model's time on cpu" in out


def test_a_float_tree_is_not_said_to_run_integer_or_decode_once(tmp_path, capsys):
  # Both modes run the float model as it is on a tree with no compressed leaf, so reports call
  # either "float"; bfloat16 keeps its name (its matmuls run in bf16 there too).
  assert serving.mode_label("integer", False) == serving.mode_label("decode-once", False)
  assert serving.mode_label("bfloat16", False) == "bfloat16"
  assert serving.mode_label("integer", True) == "integer"
  recipe = tmp_path / "recipe.yaml"
  recipe.write_text("model: digits-mlp\nstages: []\nexport: {}\n")
  out = tmp_path / "ckpt"
  assert main(["compress", str(recipe), "--out", str(out)]) == 0
  capsys.readouterr()
  for mode, label in (("integer", serving.FLOAT_MODE), ("bfloat16", "bfloat16")):
    code, text, _ = _eval(capsys, str(out), "--serving", mode)
    assert code == 0 and f"serving mode {label}:" in text
  assert main(["inspect", str(out)]) == 0
  text = " ".join(capsys.readouterr().out.split())
  recorded = json.loads((out / "manifest.json").read_text())["metrics"]["serving"]["serving_mode"]
  label = serving.mode_label(recorded, compressed=False)
  assert f"serving mode: {label} (" in text
