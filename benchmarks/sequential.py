"""sequential: block-by-block calibration against one pass, on tiny-lm and MiniLM.

Each row runs one recipe twice, with `sequential: false` (every kernel's statistics collected
from the float model in one pass) and `sequential: true` (the default: each block calibrated
on the outputs of the blocks already compressed; GPTQ, AWQ and SparseGPT moved toward the
float model's outputs, Wanda's mask the one closest to them). Every run is its own process,
so its peak resident memory (`ru_maxrss`, which includes the model, data and JAX itself) is
its own.
Metrics on held-out data: tiny-lm perplexity on the stdlib-text test windows (lower is
better), MiniLM mean cosine to the float embeddings on the 200 held-out sentences.

`JAXSHRINK_SEQUENTIAL_MODELS=minilm-l6` reruns one model's rows (about 15 minutes per model) and
`JAXSHRINK_SEQUENTIAL_METHODS="Wanda 50%"` one method's (comma-separated labels of `METHODS`);
the other rows are carried over from the stored `results/sequential.json`, and every row's
`measured` note gives the date of the run that measured it.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from jaxshrink.bench import Record

SUITE = "sequential"
DESCRIPTION = (
  "Sequential (block-by-block) calibration against one pass for GPTQ, AWQ, SparseGPT and Wanda: "
  "held-out metric and peak memory of each run, in separate processes."
)
INT3 = {"weight_bits": 3, "group_size": 32, "symmetric": False}
METHODS = (
  ("GPTQ int3 g32", {"quantize": {**INT3, "method": "gptq"}}),
  ("AWQ int3 g32", {"quantize": {**INT3, "method": "awq"}}),
  ("SparseGPT 50%", {"prune": {"method": "sparsegpt", "sparsity": 0.5}}),
  ("Wanda 50%", {"prune": {"method": "wanda", "sparsity": 0.5}}),
  ("SparseGPT 2:4", {"prune": {"method": "sparsegpt", "structure": "2:4"}}),
)
MODELS = {"tiny-lm": None, "minilm-l6": "minilm-sentences"}
STORED = Path(__file__).resolve().parent / "results" / f"{SUITE}.json"

_CHILD = textwrap.dedent(
  """
  import json, resource, sys, time
  from jaxshrink.recipes import parse_recipe, run_recipe
  raw = json.loads(sys.argv[1])
  start = time.perf_counter()
  out = run_recipe(parse_recipe(raw), progress=False)
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps({"value": out.metrics["value"], "reference": out.metrics["reference_value"],
                    "seconds": seconds, "peak_rss": peak, "bytes": out.report.total_bytes,
                    "float32_bytes": out.report.float32_bytes}))
  """
)


def _run(model: str, stage: dict, sequential: bool) -> dict:
  kind, options = next(iter(stage.items()))
  raw = {"model": model, "stages": [{kind: {**options, "target": ".*kernel",
                                            "sequential": sequential}}],
         "export": {"serving": None}}  # fmt: skip
  if MODELS[model]:
    raw["data"] = MODELS[model]
  done = subprocess.run(
    [sys.executable, "-c", _CHILD, json.dumps(raw)], capture_output=True, text=True, check=True
  )
  return json.loads(done.stdout.strip().splitlines()[-1])


def _stored(model: str, label: str) -> list[Record]:
  """The stored rows of `model` and method `label`, each with the date that measured it."""
  if not STORED.is_file():
    return []
  payload = json.loads(STORED.read_text())
  rows = [
    Record(**raw)
    for raw in payload["records"]
    if raw["model"] == model and raw["method"] in (f"{label} one pass", f"{label} sequential")
  ]
  for record in rows:
    record.extra.setdefault("measured", payload["date"])
  return rows


def _chosen(variable: str) -> set[str]:
  return {m.strip() for m in os.environ.get(variable, "").split(",")} - {""}


def run() -> list[Record]:
  models, methods = _chosen("JAXSHRINK_SEQUENTIAL_MODELS"), _chosen("JAXSHRINK_SEQUENTIAL_METHODS")
  records = []
  for model in MODELS:
    for label, stage in METHODS:
      if (models and model not in models) or (methods and label not in methods):
        records.extend(_stored(model, label))
        continue
      for sequential in (False, True):
        out = _run(model, stage, sequential)
        records.append(
          Record(
            suite=SUITE,
            model=model,
            method=f"{label} {'sequential' if sequential else 'one pass'}",
            metric="perplexity" if model == "tiny-lm" else "cosine",
            value=out["value"],
            reference_value=out["reference"],
            size_bytes=out["bytes"],
            float32_bytes=out["float32_bytes"],
            seconds=round(out["seconds"], 1),
            extra={
              "peak_rss_mb": round(out["peak_rss"] / 1e6, 1),
              "sequential": sequential,
              "measured": datetime.date.today().isoformat(),
            },
          )
        )
  return records


def summarize(records: list[Record]) -> str:
  """Per row: the better mode on the held-out metric, and the peak memory of each."""
  lines = []
  rows: dict[tuple[str, str], dict[bool, Record]] = {}
  for r in records:
    key = (r.model, r.method.replace(" one pass", "").replace(" sequential", ""))
    rows.setdefault(key, {})[r.extra["sequential"]] = r
  for (model, label), pair in rows.items():
    if set(pair) != {False, True}:
      continue
    one, seq = pair[False], pair[True]
    lower = one.metric == "perplexity"
    better = (seq.value <= one.value) if lower else (seq.value >= one.value)
    lines.append(
      f"- {model} {label}: one pass {one.value:.4f}, sequential {seq.value:.4f} "
      f"({'at least as good' if better else 'worse'}); peak memory "
      f"{one.extra['peak_rss_mb']:.0f} MB one pass, {seq.extra['peak_rss_mb']:.0f} MB sequential."
    )
  return "\n".join(lines)
