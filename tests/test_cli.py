"""The command line: exit codes, compress -> eval -> inspect, demo --quick."""

import json
import subprocess
import sys

import pytest

from jaxshrink.cli import main

RECIPE = """\
model: digits-cnn
data: digits
stages:
  - cast: {target: ".*kernel", dtype: bfloat16}
export: {}
"""


def run(capsys, *argv):
  try:
    code = main(list(argv))
  except SystemExit as e:  # argparse usage errors
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp("cli")
  recipe = directory / "recipe.yaml"
  recipe.write_text(RECIPE)
  out = directory / "ckpt"
  assert main(["compress", str(recipe), "--out", str(out)]) == 0
  return out


def test_console_script_help_lists_commands():
  result = subprocess.run(
    [sys.executable, "-m", "jaxshrink.cli", "--help"], capture_output=True, text=True, check=True
  )
  for command in ("demo", "compress", "eval", "inspect", "bench"):
    assert command in result.stdout


def test_no_command_is_usage_error(capsys):
  code, _, err = run(capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1


def test_misspelt_stage_exits_2_naming_it(capsys, tmp_path):
  recipe = tmp_path / "typo.yaml"
  recipe.write_text("model: digits-cnn\nstages:\n  - quantise: {weight_bits: 8}\n")
  code, _, err = run(capsys, "compress", str(recipe), "--out", str(tmp_path / "o"))
  assert code == 2
  assert len(err.strip().splitlines()) == 1
  assert "Unknown stage `quantise`" in err
  assert not (tmp_path / "o").exists()


def test_unknown_model_exits_1(capsys, tmp_path):
  recipe = tmp_path / "r.yaml"
  recipe.write_text("model: resnet-9000\n")
  code, _, err = run(capsys, "compress", str(recipe), "--out", str(tmp_path / "o"))
  assert code == 1 and "resnet-9000" in err and len(err.strip().splitlines()) == 1


def test_debug_adds_traceback(capsys, tmp_path):
  recipe = tmp_path / "r.yaml"
  recipe.write_text("model: resnet-9000\n")
  code, _, err = run(capsys, "compress", str(recipe), "--out", str(tmp_path / "o"), "--debug")
  assert code == 1 and "Traceback" in err


def test_eval_of_non_checkpoint_exits_1(capsys, tmp_path):
  code, _, err = run(capsys, "eval", str(tmp_path))
  assert code == 1 and "not a jaxshrink checkpoint" in err


def test_compress_refuses_existing_out(capsys, checkpoint, tmp_path):
  recipe = tmp_path / "r.yaml"
  recipe.write_text(RECIPE)
  code, _, err = run(capsys, "compress", str(recipe), "--out", str(checkpoint))
  assert code == 2 and "--overwrite" in err


def test_compress_json(capsys, tmp_path):
  recipe = tmp_path / "float.yaml"
  recipe.write_text("model: digits-cnn\nstages: []\n")
  code, out, _ = run(capsys, "compress", str(recipe), "--out", str(tmp_path / "f"), "--json")
  assert code == 0
  summary = json.loads(out)
  assert summary["metric"] == "accuracy"
  assert summary["value"] == summary["reference_value"] >= 0.97
  assert summary["ratio"] == 1.0


def test_eval_json_matches_float_reference(capsys, checkpoint):
  code, out, _ = run(capsys, "eval", str(checkpoint), "--json")
  assert code == 0
  payload = json.loads(out)
  assert payload["metric"] == "accuracy"
  assert set(payload) >= {"metric", "value", "reference_value"}
  assert payload["reference_value"] >= 0.97
  assert abs(payload["value"] - payload["reference_value"]) <= 0.01


def test_eval_on_user_data_file(capsys, checkpoint, tmp_path):
  import numpy as np

  from jaxshrink.data import get_dataset

  digits = get_dataset("digits")
  path = tmp_path / "mine.npz"
  np.savez(path, x_test=digits.x_test[:50], y_test=digits.y_test[:50])
  code, out, _ = run(capsys, "eval", str(checkpoint), "--data", str(path), "--json")
  assert code == 0
  assert json.loads(out)["data"] == str(path)


def test_inspect_json_keys_and_totals(capsys, checkpoint):
  code, out, _ = run(capsys, "inspect", str(checkpoint), "--json")
  assert code == 0
  payload = json.loads(out)
  assert {"layers", "total_bytes", "float32_bytes", "ratio"} <= set(payload)
  for layer in payload["layers"]:
    assert {"path", "shape", "encoding", "bits_per_weight", "sparsity", "bytes"} <= set(layer)
  kernels = [layer for layer in payload["layers"] if layer["path"].endswith("kernel")]
  assert kernels and all(layer["bits_per_weight"] == 16.0 for layer in kernels)
  assert payload["total_bytes"] == sum(layer["bytes"] for layer in payload["layers"])
  assert payload["ratio"] == pytest.approx(
    payload["float32_bytes"] / payload["total_bytes"], rel=1e-3
  )
  assert payload["ratio"] > 1.9


def test_inspect_table(capsys, checkpoint):
  code, out, _ = run(capsys, "inspect", str(checkpoint))
  assert code == 0 and "total" in out and "bfloat16 storage" in out


def test_demo_quick_end_to_end(capsys, tmp_path):
  code, out, _ = run(capsys, "demo", "--quick", "--out", str(tmp_path / "demo"))
  assert code == 0
  rows = json.loads((tmp_path / "demo" / "demo.json").read_text())
  by_method = {r["method"]: r for r in rows}
  assert by_method["float32"]["ratio"] == 1.0
  assert by_method["float32"]["value"] >= 0.97
  assert by_method["bf16 storage"]["ratio"] > 1.8
  assert abs(by_method["bf16 storage"]["value"] - by_method["float32"]["value"]) <= 0.01
  assert (tmp_path / "demo" / "demo.png").stat().st_size > 1000
  assert "bf16 storage" in out


def test_bench_unknown_suite_exits_2(capsys):
  code, _, err = run(capsys, "bench", "--suite", "nope")
  assert code == 2 and "Unknown benchmark suite `nope`" in err


def test_export_safetensors(capsys, checkpoint, tmp_path):
  from jaxshrink.export import import_safetensors

  out = tmp_path / "model.safetensors"
  code, stdout, _ = run(capsys, "export", str(checkpoint), "--to", "safetensors", str(out))
  assert code == 0 and out.is_file() and "wrote" in stdout
  tree = import_safetensors(out)
  assert tree["dense1"]["kernel"].shape == (1024, 128)
  code, _, err = run(capsys, "export", str(checkpoint), "--to", "safetensors", str(out))
  assert code == 2 and "--overwrite" in err


def test_eval_refuses_checkpoint_of_another_model(capsys, checkpoint, tmp_path):
  import shutil

  other = tmp_path / "other"
  shutil.copytree(checkpoint, other)
  manifest_path = other / "manifest.json"
  manifest = json.loads(manifest_path.read_text())
  manifest["model"] = "digits-mlp"
  manifest_path.write_text(json.dumps(manifest))
  code, _, err = run(capsys, "eval", str(other))
  assert code == 1 and "do not match model `digits-mlp`" in err
