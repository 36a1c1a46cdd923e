"""The benchmark runner: JSON per suite, BENCHMARKS.md with summaries and figures."""

import json

from jaxshrink.bench import run_benchmarks

SUITE_SOURCE = """
from jaxshrink.bench import Record

SUITE = "toy"
DESCRIPTION = "A toy suite."


def run():
  return [Record("toy", "m", "int8", "cosine", 0.99, 1.0, 100, 400, 0.5, {"time_ratio": 0.8})]


def summarize(records):
  return f"Target cosine >= 0.98: met ({records[0].value})."


def plot(records, ax):
  ax.scatter([r.size_bytes for r in records], [r.value for r in records])
"""


def test_runner_writes_json_summary_and_figure(tmp_path):
  benchmarks = tmp_path / "benchmarks"
  benchmarks.mkdir()
  (benchmarks / "toy.py").write_text(SUITE_SOURCE)
  records = run_benchmarks(["toy"], directory=benchmarks)
  assert [r.method for r in records] == ["int8"]
  payload = json.loads((benchmarks / "results" / "toy.json").read_text())
  assert payload["summary"] == "Target cosine >= 0.98: met (0.99)."
  assert payload["records"][0]["extra"] == {"time_ratio": 0.8}
  assert (benchmarks / "results" / "toy.png").stat().st_size > 1000
  markdown = (tmp_path / "BENCHMARKS.md").read_text()
  row = "| m | int8 | cosine | 0.9900 | 1.0000 | 100 B | 4.00x | 0.50 | time_ratio=0.800 |"
  assert row in markdown
  assert "Target cosine >= 0.98: met (0.99)." in markdown
  assert "![toy](benchmarks/results/toy.png)" in markdown
