"""recover: what the `recover` stage wins back after one-shot compression.

Each row runs a recipe's compression stages, measures the metric (`before`), then runs its
`recover` stage and measures again (`value`), against the float model (`reference_value`).
MiniLM rows: `examples/recipes/minilm-*-recover.yaml`, mean cosine to the float embeddings on the
200 held-out sentences of `minilm-sentences`, recovered on the offline transfer corpus. Digits
rows: digits-cnn test accuracy, recovered on the training split. `seconds` is the recover stage's
wall time, `extra.compress_seconds` the stages before it; both on this machine's CPU.

Set `JAXSHRINK_RECOVER_ROWS=digits` or `=prune50-sparsegpt-recover,lowrank-mlp-recover` (recipe
stems) to rerun a subset: each MiniLM row takes 8-17 CPU-minutes. The rows not rerun are carried
over from the stored `results/recover.json`; every row's `measured` note gives the date of the
run that measured it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from pathlib import Path

from jaxshrink.bench import Record

SUITE = "recover"
DESCRIPTION = (
  "One-shot compression, then the `recover` stage (distillation from the float model that keeps "
  "masks, quantization grids and ranks): metric before and after, recover minutes on CPU."
)
RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
MINILM = (
  ("prune50-sparsegpt-recover", "50% SparseGPT + recover"),
  ("2of4-sparsegpt-recover", "2:4 SparseGPT + recover"),
  ("lowrank-mlp-recover", "low-rank MLP half params + recover"),
  ("distill-l3-recover", "3-layer student + recover"),
)
DIGITS_RECOVER = {"steps": 200}
DIGITS = (
  ("50% oneshot + recover", {"prune": {"target": ".*kernel", "method": "oneshot",
                                       "sparsity": 0.5}}),
  ("int4 RTN g32 + recover", {"quantize": {"target": ".*kernel", "weight_bits": 4,
                                           "group_size": 32}}),
  ("low-rank budget 0.5 + recover", {"factorize": {"target": ".*kernel", "budget": 0.5,
                                                   "method": "svd"}}),
)  # fmt: skip


STORED = Path(__file__).resolve().parent / "results" / f"{SUITE}.json"


def _selected(name: str) -> bool:
  chosen = os.environ.get("JAXSHRINK_RECOVER_ROWS", "")
  if not chosen:
    return True
  parts = {p.strip() for p in chosen.split(",")}
  return name in parts or ("digits" in parts and name.startswith("digits:"))


def _stored() -> dict[str, Record]:
  """The rows of the stored results by method, each with the date that measured it."""
  if not STORED.is_file():
    return {}
  payload = json.loads(STORED.read_text())
  rows = {}
  for raw in payload["records"]:
    record = Record(**raw)
    record.extra.setdefault("measured", payload["date"])
    rows[record.method] = record
  return rows


def _row(recipe, label: str) -> Record:
  """Runs `recipe` up to its last stage (a `recover`), measures, recovers, measures again."""
  from jaxshrink.recipes import evaluate_metrics, evaluate_tree, prepare, run_stages
  from jaxshrink.report import tree_report

  compress = dataclasses.replace(recipe, stages=recipe.stages[:-1])
  start = time.perf_counter()
  pipeline = run_stages(compress, prepare(recipe, progress=False))
  compress_seconds = time.perf_counter() - start
  before = evaluate_metrics(pipeline.model, pipeline.tree, pipeline.dataset)
  recover_only = dataclasses.replace(recipe, stages=recipe.stages[-1:])
  start = time.perf_counter()
  pipeline = run_stages(recover_only, pipeline)
  seconds = time.perf_counter() - start
  after = evaluate_metrics(pipeline.model, pipeline.tree, pipeline.dataset)
  reference = evaluate_tree(pipeline.float_model, pipeline.float_params, pipeline.dataset)
  report = tree_report(pipeline.tree)
  log = pipeline.log[-1].get("recovered", {})
  return Record(
    suite=SUITE,
    model=pipeline.model.name,
    method=label,
    metric=pipeline.model.metric,
    value=after["value"],
    reference_value=reference,
    size_bytes=report.total_bytes,
    float32_bytes=report.float32_bytes,
    seconds=round(seconds, 1),
    extra={
      "before": before["value"],
      "minutes": round(seconds / 60, 2),
      "compress_seconds": round(compress_seconds, 1),
      "options": dict(recipe.stages[-1][1]),
      "data": log.get("data"),
      "trained_leaves": log.get("trained"),
      "frozen_leaves": len(log.get("frozen", {})),
      "teacher_cache": log.get("teacher_cache"),
      **{k: round(v, 4) for k, v in after.items() if k != "value"},
    },
  )


def run() -> list[Record]:
  from jaxshrink.recipes import load_recipe, parse_recipe

  stored = _stored()
  records = []

  def measure(selected: bool, label: str, recipe) -> None:
    if selected:
      record = _row(recipe(), label)
      record.extra["measured"] = datetime.date.today().isoformat()
      records.append(record)
    elif label in stored:
      records.append(stored[label])

  for stage_name, stage in DIGITS:
    measure(
      _selected(f"digits:{stage_name}"), stage_name,
      lambda stage=stage: parse_recipe({"model": "digits-cnn",
                                        "stages": [stage, {"recover": dict(DIGITS_RECOVER)}]}),
    )  # fmt: skip
  for stem, label in MINILM:
    measure(_selected(stem), label, lambda stem=stem: load_recipe(RECIPES / f"minilm-{stem}.yaml"))
  return records


# The targets for MiniLM after recovery (mean cosine to the float embeddings).
TARGETS = {
  "50% SparseGPT + recover": 0.97,
  "2:4 SparseGPT + recover": 0.95,
  "low-rank MLP half params + recover": 0.95,
  "3-layer student + recover": 0.95,
}


def summarize(records: list[Record]) -> str:
  """Targets met or missed, before and after, with the recover minutes."""
  lines = []
  for r in records:
    target = TARGETS.get(r.method)
    if target is None or r.value is None:
      continue
    verdict = "met" if r.value >= target else f"missed by {target - r.value:.3f}"
    lines.append(
      f"- {r.method}: {r.extra['before']:.3f} -> {r.value:.3f} (target {target:.2f}, {verdict}); "
      f"{r.extra['minutes']:.1f} min of recovery on CPU."
    )
  return "\n".join(lines)
