"""The benchmark runner: JSON per suite, BENCHMARKS.md with summaries, figures and digits image
counts, regenerated from stored results without rerunning a suite."""

import json

import pytest

from jaxshrink.bench import (
  Record,
  default_directory,
  digits_difference,
  digits_images,
  render_markdown,
  render_only,
  run_benchmarks,
)

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


def test_digits_image_counts():
  assert digits_images(0.9888888888888889, 0.9944444444444445) == -2
  assert digits_images(1.0, 0.9944444444444445) == 2
  assert digits_difference(0.9888888888888889, 0.9944444444444445) == (
    "-0.56 points (2 of 360 images)"
  )
  assert digits_difference(0.9972222222222222, 0.9944444444444445) == (
    "+0.28 points (1 of 360 images)"
  )
  assert digits_difference(0.5, 0.5) == "0.00 points (0 of 360 images)"
  with pytest.raises(ValueError, match="`value`=0.99 is not a whole number of the 360"):
    digits_images(0.99, 0.9944444444444445)
  with pytest.raises(ValueError, match="`reference`=0.5001 is not a whole number"):
    digits_images(0.5, 0.5001)


DIGITS_SUITE = """
from jaxshrink.bench import Record

SUITE = "digits"


def run():
  raise AssertionError("render_only must not run a suite")


def summarize(records):
  return f"{len(records)} rows, best {max(r.value for r in records):.4f}."
"""


def _digits_payload(summary: str) -> dict:
  rows = [
    Record("digits", "digits-cnn", "float32", "accuracy", 0.9944444444444445,
           0.9944444444444445, 400, 400, None, {}),
    Record("digits", "digits-cnn", "int2", "accuracy", 0.9888888888888889,
           0.9944444444444445, 50, 400, None, {"bits": 2}),
    Record("digits", "tiny-lm", "int2", "perplexity", 5.0, 4.7, 50, 400, None, {}),
  ]  # fmt: skip
  return {"suite": "digits", "description": "d", "summary": summary, "date": "2026-01-01",
          "machine": {"processor": "x", "cpu_count": 2, "platform": "p", "python": "3",
                      "jax": "0", "backend": "cpu", "devices": 1},
          "records": [r.to_json() for r in rows]}  # fmt: skip


def test_render_only_states_image_counts_and_recomputes_summaries(tmp_path):
  benchmarks = tmp_path / "benchmarks"
  (benchmarks / "results").mkdir(parents=True)
  (benchmarks / "digits.py").write_text(DIGITS_SUITE)
  stored = _digits_payload("a stale summary")
  (benchmarks / "results" / "digits.json").write_text(json.dumps(stored, indent=1) + "\n")
  assert render_only(benchmarks) == tmp_path / "BENCHMARKS.md"
  markdown = (tmp_path / "BENCHMARKS.md").read_text()
  assert (
    "| digits-cnn | int2 | accuracy | 0.9889 | 0.9944 | 50 B | 8.00x | – | "
    "vs float -0.56 points (2 of 360 images); bits=2 |" in markdown
  )
  assert "| digits-cnn | float32 | accuracy | 0.9944 | 0.9944 | 400 B | 1.00x | – |  |" in markdown
  assert "| tiny-lm | int2 | perplexity | 5.0000 | 4.7000 | 50 B | 8.00x | – |  |" in markdown
  assert "3 rows, best 5.0000." in markdown and "stale" not in markdown
  payload = json.loads((benchmarks / "results" / "digits.json").read_text())
  assert payload == {**stored, "summary": "3 rows, best 5.0000."}


def test_benchmarks_md_is_current():
  directory = default_directory()
  assert render_markdown(directory) == (directory.parent / "BENCHMARKS.md").read_text(), (
    "run `python -m jaxshrink.bench`"
  )
