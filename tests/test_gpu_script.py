"""benchmarks/gpu.py runs on CPU with `--quick`: one row per (model, shape, mode), its JSON
renders into BENCHMARKS.md, and it is no benchmark suite."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from jaxshrink.bench import render_markdown

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _load():
  spec = importlib.util.spec_from_file_location("jaxshrink_gpu_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


gpu = _load()


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu")
  path = gpu.main(["--quick", "--out", str(out)])
  assert path == out / "gpu.json"
  return json.loads(path.read_text())


def test_the_script_is_not_a_suite():
  assert not hasattr(gpu, "SUITE") and not hasattr(gpu, "run")


def test_quick_run_has_every_row(payload):
  config = gpu.QUICK
  expected = {
    ("bert 2x128", f"{b}x{n}", mode) for b, n in config.bert_shapes for mode in gpu.MODES
  } | {("dense 256x256", f"M={m}", mode) for m in config.dense_rows for mode in gpu.MODES}
  rows = payload["rows"]
  assert len(rows) == len(expected) == 16
  assert {(r["model"], r["shape"], r["mode"]) for r in rows} == expected
  for r in rows:
    assert r["ms"] > 0
    if r["mode"] == "float32":
      assert r["ratio_vs_float32"] == 1.0 and r["fidelity_value"] in (0.0, 1.0)
  assert len(payload["records"]) == len(rows)
  machine = payload["machine"]
  assert machine["jax"] and machine["device_list"] == ["cpu:0"]
  assert machine["device_kind"] == "cpu"


def test_quick_run_numbers_are_sane(payload):
  rows = {(r["model"], r["shape"], r["mode"]): r for r in payload["rows"]}
  for shape in ("4x16", "1x32"):
    # Embeddings are L2-normalized: min cosine to float32 per mode.
    assert rows[("bert 2x128", shape, "bf16")]["fidelity_value"] > 0.99
    assert rows[("bert 2x128", shape, "w8a8")]["fidelity_value"] > 0.999
    assert rows[("bert 2x128", shape, "w4a16")]["fidelity_value"] > 0.95
  dense = rows[("dense 256x256", "M=16", "w8a8")]
  assert dense["fidelity_value"] < 0.02
  # int8 codes + one float32 scale per output channel; int4 g128: codes + bf16 group scales.
  assert dense["weight_bytes"] == 256 * 256 + 4 * 256
  assert rows[("dense 256x256", "M=16", "w4a16")]["weight_bytes"] == 256 * 128 + 2 * 2 * 256


def test_results_render_in_benchmarks_md(payload, tmp_path):
  results = tmp_path / "benchmarks" / "results"
  results.mkdir(parents=True)
  (results / "gpu.json").write_text(json.dumps(payload))
  shutil.copy(SCRIPT, tmp_path / "benchmarks" / "gpu.py")
  markdown = render_markdown(tmp_path / "benchmarks")
  assert "## gpu (cpu)" in markdown
  assert "| bert 2x128 4x16 | w8a8 | ms |" in markdown
  assert "| model | shape | float32 | bf16 | w8a8 | w4a16 |" in markdown
