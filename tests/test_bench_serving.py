"""The `serving` suite's tables and targets, on synthetic records (no timing, no torch)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from jaxshrink.bench import Record

SUITE_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "serving.py"


@pytest.fixture(scope="module")
def suite():
  spec = importlib.util.spec_from_file_location("jaxshrink_bench_serving_test", SUITE_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


MIB = 2**20


def timing(suite, shape, method, mode, value, *, recommended=None, vs_int8=None, disk=80 * MIB,
           library="jaxshrink", peak=None, **extra):  # fmt: skip
  return Record(
    suite.SUITE, f"minilm-l6 {shape}", method, "time_vs_float", value, 1.0, disk, 80 * MIB, None,
    {"shape": shape, "ms": 10.0 * value, "mode": mode, "recommended": recommended,
     "time_vs_torch_int8": vs_int8, "time_vs_torch_f32": None, "disk_bytes": disk,
     "ratio_disk": round(80 * MIB / disk, 3), "peak_bytes": peak or disk, "library": library,
     **extra},
  )  # fmt: skip


def cosine(suite, method, value, mode):
  return Record(suite.SUITE, "minilm-l6", method, "cosine", value, 1.0, MIB, 80 * MIB, None,
                {"mode": mode, "mean_cosine": value})  # fmt: skip


def records(suite, *, w8a8=(0.5, 0.55), int4=0.9, torch=True):
  w8, f32, t32, t8 = suite.W8A8, suite.FLOAT, suite.TORCH_F32, suite.TORCH_INT8
  out = []
  for shape, w in zip(("64x32", "32x128"), w8a8, strict=True):
    out += [
      timing(suite, shape, f32, "float", 1.0, vs_int8=0.8 if torch else None, cpu_flags="avx2"),
      timing(suite, shape, w8, "integer", w, recommended=True, vs_int8=w * 0.8 if torch else None,
             disk=20 * MIB),
      timing(suite, shape, w8, "decode-once", 1.02, recommended=False,
             vs_int8=0.82 if torch else None, disk=20 * MIB, peak=80 * MIB),
      timing(suite, shape, "int4 GPTQ g128", "decode-once", int4, recommended=True,
             disk=12 * MIB, peak=80 * MIB),
    ]  # fmt: skip
    if torch:
      out += [
        timing(suite, shape, t32, "torch", 1.5, vs_int8=1.2, library="torch"),
        timing(suite, shape, t8, "torch", 1.25, vs_int8=1.0, disk=56 * MIB, library="torch"),
      ]
  out += [cosine(suite, w8, 0.9972, "integer"), cosine(suite, "int4 GPTQ g128", 0.9822, "d")]
  if torch:
    out += [cosine(suite, t32, 1.0, "torch"), cosine(suite, t8, 0.9486, "torch")]
  return out


def test_table_lists_baselines_first_then_recommended_rows_with_other_modes(suite):
  rows = [r for r in records(suite) if r.metric == "time_vs_float" and r.extra["shape"] == "64x32"]
  cosines = {suite.W8A8: 0.9972, suite.FLOAT: 1.0, suite.TORCH_INT8: 0.9486}
  lines = suite.table(rows, cosines)
  assert lines[0].startswith("| row | mode | time vs float | vs torch int8 | MiB on disk |")
  assert [line.split(" | ")[0] for line in lines[2:]] == [
    f"| {suite.TORCH_F32}",
    f"| {suite.TORCH_INT8}",
    f"| {suite.FLOAT}",
    f"| {suite.W8A8}",
    "| int4 GPTQ g128",
  ]
  assert lines[5] == (
    f"| {suite.W8A8} | integer | 0.50 | 0.40 | 20.0 | 0.9972 | decode-once 1.02 |"
  )
  assert lines[3] == f"| {suite.TORCH_INT8} | torch | 1.25 | 1.00 | 56.0 | 0.9486 | – |"
  assert lines[6] == "| int4 GPTQ g128 | decode-once | 0.90 | – | 12.0 | – | – |"


def test_summary_states_every_target_met(suite):
  text = suite.summarize(records(suite))
  assert text.count("| row | mode |") == 2
  assert "- (a) W8A8 at or below 0.6x" in text
  assert "**met**: 0.50x at 64x32 (integer), 0.55x at 32x128 (integer)" in text
  assert "64x32: 0.40x torch int8's time" in text and "32x128: 0.44x torch int8's time" in text
  assert "**missed**" not in text
  assert "at any shape: **met**: 0 of 4 recommended rows above 1.0." in text
  assert "0.90-1.02 over 2 rows at 64x32" in text
  assert text.rstrip().endswith("amx_bf16): avx2.")


def test_summary_states_missed_targets_with_numbers_and_why(suite):
  text = suite.summarize(records(suite, w8a8=(0.95, 0.7), int4=1.1))
  assert "(a) W8A8 at or below 0.6x the float32 time at 64x32 and 32x128: **missed**: 0.95x" in text
  assert "no int8 dot-product instructions" in text  # cpu flags: avx2 only
  assert (
    "(b) best jaxshrink 8-bit at or below torch quantize_dynamic's time at every shape: "
    "**met**" in text
  )  # 0.76 and 0.56 of torch int8's time
  assert (
    "**missed**: 2 of 4 recommended rows above 1.0; 2 of them run `decode-once`, the float32 "
    "computation itself, at 1.10-1.10x (noise, see below)." in text
  )


def test_summary_without_torch_rows_says_so(suite):
  text = suite.summarize(records(suite, torch=False))
  assert "- (b) not measured: no torch rows in this run." in text
  assert suite.TORCH_INT8 not in text


def test_plot_draws_one_point_per_row_at_32x128(suite):
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots()
  suite.plot(records(suite), ax)
  # float, W8A8 (recommended), int4, torch f32, torch int8; decode-once W8A8 is not recommended.
  assert len(ax.collections) == 5
  plt.close(fig)


def test_time_interleaved_times_every_function_each_round(suite, monkeypatch):
  monkeypatch.setattr(suite, "ROUNDS", 3)
  counts = {"a": 0, "b": 0}

  def call(name):
    counts[name] += 1
    return name

  best = suite.time_interleaved({"a": lambda: call("a"), "b": lambda: call("b")}, "a")
  assert set(best) == {"a", "b"} and all(v >= 0 for v in best.values())
  # warm-up once each, one baseline probe, then 3 rounds of the same number of calls
  assert (counts["a"] - 2) == counts["b"] - 1 and (counts["b"] - 1) % 3 == 0
