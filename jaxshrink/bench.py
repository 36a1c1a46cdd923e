"""Benchmark runner: suites in `benchmarks/` write JSON records and BENCHMARKS.md.

A suite is a file `benchmarks/<name>.py` defining `SUITE = "<name>"`, a one-line
`DESCRIPTION` and `run() -> list[Record]`. The runner stores each suite's records
in `benchmarks/results/<name>.json` and regenerates `BENCHMARKS.md` next to
`benchmarks/` from every stored result, so suites can be rerun one at a time.

Optionally a suite defines `summarize(records) -> str`, markdown printed under its table
(targets met or missed, with the numbers), and `plot(records, ax)`, which draws on a
matplotlib Axes; the figure is saved as `benchmarks/results/<name>.png` and shown in
BENCHMARKS.md.

Timings on shared CPUs are noisy: suites report a time as a ratio against a
baseline measured side by side in the same run (in `extra`), never alone.

`python -m jaxshrink.bench` regenerates BENCHMARKS.md (and each suite's summary) from the
stored results without rerunning any suite.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

from jaxshrink.errors import InvalidValueError, JaxshrinkError, UsageError
from jaxshrink.report import format_bytes

RESULTS = "results"
MARKDOWN = "BENCHMARKS.md"
# The `digits` test split (jaxshrink.data): a fixed stratified 360 images, so one image is
# 100/360 = 0.28 points of accuracy; an accuracy change is reported with its image count.
DIGITS_TEST_IMAGES = 360


@dataclasses.dataclass(frozen=True)
class Record:
  """One benchmark row.

  Attributes:
    suite, model, method: what was measured.
    metric: `accuracy`, `perplexity`, `seconds`, ...
    value: the measured metric.
    reference_value: the same metric for the float baseline in the same run.
    size_bytes: stored bytes of the (compressed) parameters.
    float32_bytes: bytes of the same parameters in float32.
    seconds: wall time of the measured work.
    extra: free-form details (ratios, settings, notes).
  """

  suite: str
  model: str
  method: str
  metric: str
  value: float | None
  reference_value: float | None
  size_bytes: int | None
  float32_bytes: int | None
  seconds: float | None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def best_time(fn, repeats: int = 5) -> float:
  """Fastest of `repeats` runs of `fn()` in seconds, waiting for its JAX results."""
  import jax

  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def interleaved_best(fns: dict[str, Any], rounds: int = 5, calls: int = 1) -> dict[str, float]:
  """Best seconds per call of each `fn()`, timed round-robin so load drifts hit all alike.

  Each round runs every function `calls` times in a row (waiting once at the end); a function
  must already be compiled.
  """
  import jax

  best = dict.fromkeys(fns, float("inf"))
  for _ in range(max(rounds, 1)):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(calls):
        out = fn()
      jax.block_until_ready(out)
      best[name] = min(best[name], (time.perf_counter() - start) / calls)
  return best


def calls_per_round(fn: Any, seconds: float, most: int = 50) -> int:
  """How many calls of the compiled `fn()` fill about `seconds` (1 to `most`), from one timed
  call: a round of a few-millisecond call is then not measured against the timer's and the
  scheduler's noise."""
  import jax

  start = time.perf_counter()
  jax.block_until_ready(fn())
  return max(1, min(most, round(seconds / max(time.perf_counter() - start, 1e-6))))


def default_directory() -> Path:
  """`$JAXSHRINK_BENCHMARKS`, the repository's `benchmarks/`, or `./benchmarks`."""
  if "JAXSHRINK_BENCHMARKS" in os.environ:
    return Path(os.environ["JAXSHRINK_BENCHMARKS"])
  repo = Path(__file__).resolve().parents[1] / "benchmarks"
  return repo if repo.is_dir() else Path("benchmarks")


def discover(directory: Path) -> dict[str, Path]:
  if not directory.is_dir():
    raise JaxshrinkError(
      f"No benchmarks directory at `{directory}`; run from a jaxshrink checkout or pass --dir."
    )
  # A suite declares `SUITE = ...` at top level; other scripts there (e.g. gpu.py, run by hand
  # on an accelerator) are not suites.
  return {
    p.stem: p
    for p in sorted(directory.glob("*.py"))
    if not p.stem.startswith("_") and _SUITE_LINE.search(p.read_text())
  }


_SUITE_LINE = re.compile(r"^SUITE\s*=", re.M)


def _load_suite(path: Path):
  name = f"jaxshrink_bench_{path.stem}"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # `@dataclass` looks up a class's module there
  spec.loader.exec_module(module)
  if not callable(getattr(module, "run", None)):
    raise JaxshrinkError(f"Benchmark suite `{path}` defines no run() function.")
  return module


def machine_description() -> dict[str, Any]:
  import jax

  return {
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": len(jax.devices()),
    # Other work on the machine skews absolute times (ratios less so); record how busy it was.
    "load_average_1min": round(os.getloadavg()[0], 2),
  }


def run_benchmarks(
  suites: list[str] | None = None, *, json_out: Path | None = None, directory: Path | None = None
) -> list[Record]:
  """Runs the named suites (all by default) and regenerates BENCHMARKS.md."""
  directory = directory or default_directory()
  available = discover(directory)
  names = suites or list(available)
  for name in names:
    if name not in available:
      raise UsageError(f"Unknown benchmark suite `{name}`; suites: {', '.join(available)}.")
  records: list[Record] = []
  for name in names:
    module = _load_suite(available[name])
    machine = machine_description()  # before the run: how busy the machine was when it began
    suite_records = list(module.run())
    machine["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    payload = {
      "suite": name,
      "description": getattr(module, "DESCRIPTION", ""),
      "summary": module.summarize(suite_records) if hasattr(module, "summarize") else "",
      "date": datetime.date.today().isoformat(),
      "machine": machine,
      "records": [r.to_json() for r in suite_records],
    }
    (directory / RESULTS).mkdir(exist_ok=True)
    (directory / RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    if hasattr(module, "plot"):
      _plot(module.plot, suite_records, directory / RESULTS / f"{name}.png")
    records.extend(suite_records)
  if json_out is not None:
    json_out.write_text(json.dumps([r.to_json() for r in records], indent=1) + "\n")
  write_markdown(directory)
  return records


def _plot(draw, records: list[Record], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")  # no display on CI machines or TPU VMs
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  draw(records, ax)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def digits_images(value: float, reference: float) -> int:
  """Test images of `digits` gained (+) or lost (-) between two accuracies on its test split.

  >>> digits_images(0.9888888888888889, 0.9944444444444445)
  -2

  Raises:
    ValueError: an accuracy is not a whole number of the 360 test images (it was measured
      on another set).
  """
  counts = []
  for name, accuracy in (("value", value), ("reference", reference)):
    count = accuracy * DIGITS_TEST_IMAGES
    if abs(count - round(count)) > 1e-6:
      raise InvalidValueError(
        f"`{name}`={accuracy!r} is not a whole number of the {DIGITS_TEST_IMAGES} digits test "
        f"images ({count:.3f}); pass accuracies measured on the full `digits` test split."
      )
    counts.append(round(count))
  return counts[0] - counts[1]


def digits_difference(value: float, reference: float) -> str:
  """An accuracy change on the `digits` test split in points and images.

  >>> digits_difference(0.9888888888888889, 0.9944444444444445)
  '-0.56 points (2 of 360 images)'
  """
  images = digits_images(value, reference)
  points = f"{100 * images / DIGITS_TEST_IMAGES:+.2f}" if images else "0.00"
  return f"{points} points ({abs(images)} of {DIGITS_TEST_IMAGES} images)"


def is_digits_accuracy(record: dict[str, Any]) -> bool:
  """Whether a stored record is an accuracy on the `digits` test split, against a reference."""
  return (
    record["model"].startswith("digits")
    and record["metric"] == "accuracy"
    and not record["method"].startswith("float32")  # the reference row itself
    and record["value"] is not None
    and record["reference_value"] is not None
  )


def _cell(value: Any, digits: int = 4) -> str:
  if value is None:
    return "–"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


def render_markdown(directory: Path) -> str:
  """BENCHMARKS.md text from every stored suite result."""
  lines = [
    "# Benchmarks",
    "",
    "Generated by `jaxshrink bench` from `benchmarks/results/*.json`; do not edit by hand.",
    "Sizes are stored parameter bytes; `ratio` is float32 bytes over stored bytes. Timings",
    "are ratios against a baseline measured side by side in the same run.",
    "",
  ]
  for path in sorted((directory / RESULTS).glob("*.json")):
    payload = json.loads(path.read_text())
    machine = payload["machine"]
    lines += [
      f"## {payload['suite']}",
      "",
      payload.get("description", ""),
      "",
      f"Run {payload['date']} on {machine['processor']}, {machine['cpu_count']} CPUs, "
      f"{machine['platform']}, Python {machine['python']}, jax {machine['jax']} "
      f"({machine['backend']}, {machine['devices']} device(s))"
      + (
        f", load average {machine['load_average_1min']} at start"
        + (
          f", {machine['load_average_1min_after']} at the end."
          if "load_average_1min_after" in machine
          else "."
        )  # fmt: skip
        if "load_average_1min" in machine
        else "; load not recorded (these runs shared the machine with other jobs)."
      ),
      "",
      "| model | method | metric | value | float reference | size | ratio | seconds | notes |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["records"]:
      size, f32 = r["size_bytes"], r["float32_bytes"]
      ratio = f"{f32 / size:.2f}x" if size and f32 else "–"
      notes = [f"{k}={_cell(v, 3)}" for k, v in r["extra"].items()]
      if is_digits_accuracy(r):
        notes.insert(0, f"vs float {digits_difference(r['value'], r['reference_value'])}")
      lines.append(
        f"| {r['model']} | {r['method']} | {r['metric']} | {_cell(r['value'])} | "
        f"{_cell(r['reference_value'])} | {format_bytes(size) if size else '–'} | {ratio} | "
        f"{_cell(r['seconds'], 2)} | {'; '.join(notes)} |"
      )
    if payload.get("summary"):
      lines += ["", payload["summary"].strip()]
    figure = path.with_suffix(".png")
    if figure.is_file():
      lines += ["", f"![{payload['suite']}]({figure.relative_to(directory.parent).as_posix()})"]
    lines.append("")
  return "\n".join(lines)


def write_markdown(directory: Path) -> Path:
  target = directory.resolve().parent / MARKDOWN
  target.write_text(render_markdown(directory))
  return target


def render_only(directory: Path | None = None) -> Path:
  """Regenerates BENCHMARKS.md from the stored results, without running any suite.

  Each stored suite whose module defines `summarize` gets its summary recomputed from its
  stored records (the records themselves are not touched), so a change to how a suite words
  its summary reaches BENCHMARKS.md without rerunning the measurements.

  Returns:
    The path of the written BENCHMARKS.md.
  """
  directory = directory or default_directory()
  available = discover(directory)
  for path in sorted((directory / RESULTS).glob("*.json")):
    payload = json.loads(path.read_text())
    if payload["suite"] not in available:
      continue
    module = _load_suite(available[payload["suite"]])
    if hasattr(module, "summarize"):
      records = [Record(**r) for r in payload["records"]]
      summary = module.summarize(records)
      if summary != payload.get("summary", ""):
        payload["summary"] = summary
        path.write_text(json.dumps(payload, indent=1) + "\n")
  return write_markdown(directory)


if __name__ == "__main__":
  print(render_only())
