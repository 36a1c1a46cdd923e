"""The `search` recipe stage: give the metric you can lose, get the smallest model within it.

```yaml
stages:
  - search:
      max_drop: 0.005          # allowed relative loss of the metric vs the stage's input
      candidates: [float, bf16, int8, int4-g128, int4-g32, int3-g32]
      methods: {int4: gptq, int3: gptq}
```

1. **Sensitivity** (`sensitivity`): every candidate is applied to every selected kernel (and,
   with `tables: true` and no fixed `embeddings`, to every table the model gathers rows from,
   where the candidate fits a table) by the same stages a recipe runs; each kernel's bytes are
   read off the result and its error is the relative output error of the model with that
   kernel alone compressed, on calibration batches. Cached under `<cache>/search/`.
2. **Solve** (`solve`): the Lagrangian frontier of bytes against summed error.
3. **Verify**: assemble a frontier point with its plain stages (`candidates.assignment_stages`)
   and evaluate it on validation rows, never the calibration rows, never the test split. For a
   text model that reads MiniLM token ids (`validation_data: auto`, the default) they are the
   offline transfer corpus' last `validation_rows` sentences, everyday English and
   documentation prose, scored against the float model's embeddings: the training split's
   sentences after calibration's are mostly docstrings, whose drop under-predicts the drop on
   everyday sentences. After a `recover` that trained on the corpus, and for other models, they
   are the training rows after the ones calibration reads. A model trained on those rows
   scores them too well to tell candidates apart (digits-cnn is 100% accurate on its training
   images); `validation_data: test` verifies on the test split's first `validation_rows`
   instead, and the test metric reported afterwards then includes rows the search chose on.
   With `max_drop`, the frontier is bisected for the smallest point whose measured drop is
   within budget; each verification is one step of the progress bar and one entry of the
   log's `iterations`.

The stage's output is the verified tree itself, and its log entry (`search`) holds the plain
stages that rebuild it: `jaxshrink compress` of the recipe with the search replaced by them
reproduces the tree bit for bit (`searched_recipe`).

`max_drop` is relative to the stage's input metric on the validation rows: `(ref - value) /
ref` for metrics where higher is better, `(value - ref) / ref` for perplexity. `max_bytes`
(bytes, or a candidate name: that candidate applied to every kernel) caps the total stored
bytes; with `max_drop: null` the search returns the least-error point under the cap, with the
bytes the frontier's whole steps left unused spent greedily (`solve.fill`).

`objective: latency` minimizes the summed time of each kernel's matmul alone, timed for each
candidate in serving mode `serving` on this backend (`latency`), instead of bytes; each
verification then also records the assembled model's time against its input model's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import jax
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from jaxshrink.errors import JaxshrinkError, UsageError
from jaxshrink.evaluation import serving_model, timing_batch
from jaxshrink.pipeline import (
  RULE_OPTIONS,
  STAGES,
  Pipeline,
  calibration_inputs,
  check_options,
  register_stage,
  rule_from_options,
  run_stage,
)
from jaxshrink.report import tree_report
from jaxshrink.search.candidates import assignment_stages, parse_candidate, parse_methods
from jaxshrink.search.latency import batch_rows
from jaxshrink.search.sensitivity import cache_key, load_cached, measure, store
from jaxshrink.search.solve import Point, fill, frontier, thin
from jaxshrink.search.validation import validation_rows, validation_source
from jaxshrink.tree import select

DEFAULT_CANDIDATES = ["float", "bf16", "int8", "int4-g128", "int4-g32", "int3-g128", "int3-g32"]
OPTIONS: dict[str, Any] = {
  **RULE_OPTIONS,
  "target": ".*kernel",
  "min_ndim": 2,
  "max_drop": 0.005,
  "max_bytes": None,
  "objective": "bytes",
  "candidates": DEFAULT_CANDIDATES,
  "methods": {},
  "embeddings": None,
  "tables": True,  # search the gathered tables too (unless `embeddings` fixes their spec)
  "calibration_batches": 8,
  "sensitivity_batches": 2,
  "validation_rows": 256,
  # auto: the transfer corpus' last rows for a MiniLM-tokenized text model, else the training
  # rows after calibration's; test: its first rows, for a model trained on all of train.
  "validation_data": "auto",
  "max_verifications": 8,
  "serving": "integer",  # objective latency: the serving mode kernels are timed in
}
OBJECTIVES = ("bytes", "latency")
# Frontier points bisected at most (evenly spread in bytes): 64 -> 6 verifications.
FRONTIER_POINTS = 64
NO_INT_KERNEL = (
  "`embeddings` of `search` quantizes the tables with the kernels, and no candidate in {} "
  "quantizes a kernel. Add an int candidate (int8, int4-g128), or remove `embeddings`."
)
SENSITIVITY = "relative output error with the kernel alone compressed, on calibration batches"


def plain_stages(stages: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
  """Stages as a recipe writes them: `[{kind: options}]`."""
  return [{kind: options} for kind, options in stages]


def searched_recipe(raw: dict[str, Any], log: list[dict[str, Any]]) -> dict[str, Any]:
  """The recipe `raw` with each `search` stage replaced by the plain stages it found (read from
  the run's stage log, e.g. a checkpoint's `metrics.stages`)."""
  found = iter([entry["search"]["stages"] for entry in log if entry.get("stage") == "search"])
  stages = []
  for entry in raw.get("stages") or []:
    kind = next(iter(entry)) if isinstance(entry, dict) else entry
    stages.extend(next(found) if kind == "search" else [entry])
  return {**raw, "stages": stages}


def _check(options: dict[str, Any]) -> None:
  if options["objective"] not in OBJECTIVES:
    raise UsageError(
      f"`objective` of `search` must be one of {list(OBJECTIVES)}; got {options['objective']!r}."
    )
  drop = options["max_drop"]
  if drop is not None and not (isinstance(drop, (int, float)) and 0 <= drop < 1):
    raise UsageError(f"`max_drop` of `search` must be in [0, 1) or null; got {drop!r}.")
  if drop is None and options["max_bytes"] is None:
    raise UsageError("`search` needs a budget: `max_drop`, `max_bytes`, or both.")
  for key in ("calibration_batches", "sensitivity_batches", "validation_rows", "max_verifications"):
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise UsageError(f"`{key}` of `search` must be an int >= 1; got {value!r}.")
  if options["sensitivity_batches"] > options["calibration_batches"]:
    raise UsageError(
      "`sensitivity_batches` of `search` reads the first calibration batches, so it must be <= "
      f"`calibration_batches` ({options['calibration_batches']}); got "
      f"{options['sensitivity_batches']}."
    )
  if not isinstance(options["candidates"], list) or not options["candidates"]:
    raise UsageError(
      f"`candidates` of `search` must be a non-empty list; got {options['candidates']!r}."
    )


def _drop(reference: float, value: float, higher_is_better: bool) -> float:
  change = (reference - value) if higher_is_better else (value - reference)
  return change / max(abs(reference), 1e-12)


def _full(kind: str, options: dict[str, Any]) -> dict[str, Any]:
  return check_options(f"stage `{kind}` found by `search`", options, STAGES[kind].options)


@contextlib.contextmanager
def _progress():
  """`step(description, total)` -> `advance()`: one rich bar per search phase. The display
  starts with the first phase, so a search refused before any prints no empty bar."""
  bar = Progress(
    TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
    TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
  )  # fmt: skip

  def step(description: str, total: int):
    if not bar.live.is_started:
      bar.start()
    task = bar.add_task(description, total=total, note="")

    def advance(note: str = "") -> None:
      bar.update(task, advance=1, note=note)

    return advance

  try:
    yield step
  finally:
    if bar.live.is_started:
      bar.stop()


@register_stage(
  "search",
  options=OPTIONS,
  doc="Search one candidate per kernel (float, bf16, int8, int4-g128, 2:4, lowrank-0.5, ...) "
  "for the smallest model within `max_drop` of the metric (or the best within `max_bytes`), "
  "verified on training rows calibration never reads.",
)
def search_stage(pipeline: Pipeline, options: dict[str, Any]) -> Pipeline:
  with _progress() as step:
    return _search(pipeline, options, step)


def _search(pipeline: Pipeline, options: dict[str, Any], step: Any) -> Pipeline:
  from jaxshrink.data.cache import cache_dir
  from jaxshrink.evaluation import evaluate_metrics

  _check(options)
  candidates = [parse_candidate(name) for name in options["candidates"]]
  names = [c.name for c in candidates]
  if len(set(names)) != len(names):
    raise UsageError(f"`candidates` of `search` lists a candidate twice: {names}.")
  methods = parse_methods(options["methods"], candidates)
  if options["embeddings"] is not None and not any(c.bits and not c.nm for c in candidates):
    raise UsageError(NO_INT_KERNEL.format(names))
  paths = select(pipeline.tree, rule_from_options(options))
  tables = _tables(pipeline, options, paths)
  validation = validation_rows(pipeline, options)
  model = pipeline.model
  apply = serving_model(model).apply

  def run(p: Pipeline, kind: str, partial: dict[str, Any]) -> Pipeline:
    return run_stage(p, kind, _full(kind, partial))

  latency = options["objective"] == "latency"
  if latency:
    from jaxshrink.serving import check_mode

    check_mode(options["serving"], where="`serving` of `search`")
  settings = {
    "model": pipeline.model_source or model.name, "paths": paths, "tables": tables,
    "candidates": names,
    "latency": [options["serving"], jax.default_backend()] if latency else None,
    "methods": methods, "embeddings": options["embeddings"],
    "calibration_batches": options["calibration_batches"],
    "sensitivity_batches": options["sensitivity_batches"],
  }  # fmt: skip
  key = cache_key(settings, pipeline.tree)
  directory = cache_dir() / "search"
  sensitivity = load_cached(directory, key)
  if sensitivity is None:
    batches = calibration_inputs(
      pipeline, "train", options["sensitivity_batches"], model.batch_size, "search"
    )
    sensitivity = measure(
      pipeline, paths, candidates, methods, run_stage=run, apply_fn=apply, batches=batches,
      tables=tables, embeddings=options["embeddings"],
      calibration_batches=options["calibration_batches"],
      progress=step, time_mode=options["serving"] if latency else None,
      time_rows=batch_rows(timing_batch(pipeline.dataset)),
    )  # fmt: skip
    store(directory, key, sensitivity)

  by_name = {c.name: c for c in candidates}
  costs = sensitivity.times if latency else sensitivity.bytes
  points = frontier(sensitivity.errors, costs)
  # Quantized tables ride with a quantize stage of the kernels.
  points = [p for p in points if _assemblable(p, tables, by_name, options["embeddings"])]
  if not points:
    raise UsageError(NO_INT_KERNEL.format(names))
  cap = _max_bytes(options["max_bytes"], sensitivity, names)
  if cap is not None:
    fitting = [p for p in points if _stored(p, sensitivity) <= cap]
    if not fitting:
      smallest = min(_stored(p, sensitivity) for p in points)
      raise JaxshrinkError(
        f"`max_bytes: {options['max_bytes']}` of `search` is {cap} bytes, and the smallest "
        f"assignment of {names} stores {smallest}. Raise `max_bytes`, or add smaller "
        "candidates (int3-g32, 2:4+int4)."
      )
    points = fitting
  reference = evaluate_metrics(pipeline.model, pipeline.tree, validation)["value"]
  iterations: list[dict[str, Any]] = []
  verified: dict[int, tuple[Any, dict]] = {}

  def verify(point: Point) -> tuple[Any, dict]:
    chosen = {p: by_name[n] for p, n in point.choice.items()}
    stages = assignment_stages(
      {p: c for p, c in chosen.items() if p not in tables}, methods,
      tables={p: c for p, c in chosen.items() if p in tables},
      embeddings=options["embeddings"], calibration_batches=options["calibration_batches"],
    )  # fmt: skip
    assembled = pipeline
    for kind, partial in stages:
      assembled = run(assembled, kind, partial)
    value = evaluate_metrics(assembled.model, assembled.tree, validation)["value"]
    row = {
      "bytes": tree_report(assembled.tree).total_bytes, "value": value,
      "drop": _drop(reference, value, model.higher_is_better), "stages": stages,
      "choice": point.choice,
    }  # fmt: skip
    if latency:
      row["time_vs_float"] = _time_vs_float(pipeline, assembled, options["serving"])
    iterations.append({k: v for k, v in row.items() if k not in ("stages", "choice")})
    advance(f"{row['bytes'] / 1e6:.2f} MB, drop {row['drop']:.4f}")
    return assembled, row

  drop = options["max_drop"]
  start = time.perf_counter()
  if drop is None:
    advance = step("search: verify", 1)
    if not latency:  # spend what the frontier's whole steps left under the cap
      filled = fill(points[0], sensitivity.errors, sensitivity.bytes, cap - sensitivity.rest_bytes)
      if _assemblable(filled, tables, by_name, options["embeddings"]):
        points[0] = filled
    chosen, row = verify(points[0])
  else:
    points = thin(points, FRONTIER_POINTS)
    advance = step("search: verify", min(options["max_verifications"], len(points)))
    chosen, row = _bisect(points, verify, drop, options["max_verifications"], verified)
    if row is None:
      best = verified[0][1]
      raise JaxshrinkError(
        f"`max_drop: {drop}` of `search` cannot be met: the least-error assignment of {names} "
        f"already loses {best['drop']:.5f} of {model.metric} on {len(validation.x_test)} "
        f"validation rows ({best['value']:.5f} against {reference:.5f}). Raise `max_drop`, or "
        "add `float` to `candidates`."
      )
  layers = [
    {"path": p, "candidate": n, "bytes": sensitivity.bytes[p][n], "error": sensitivity.errors[p][n]}
    for p, n in sorted(row["choice"].items())
  ]
  entry = {
    "search": {
      "stages": plain_stages(row["stages"]),
      "layers": layers,
      "iterations": iterations,
      "validation": {"rows": len(validation.x_test), "data": validation_source(pipeline, options),
                     "reference": reference,
                     "value": row["value"], "drop": row["drop"], "bytes": row["bytes"]},
      "sensitivity": {"measure": SENSITIVITY, "seconds": sensitivity.seconds,
                      "cached": sensitivity.cached, "candidates": names, "methods": methods},
      "verify_seconds": round(time.perf_counter() - start, 3),
    }
  }  # fmt: skip
  return dataclasses.replace(chosen, log=pipeline.log + (entry,))


def _tables(pipeline: Pipeline, options: dict[str, Any], paths: list[str]) -> list[str]:
  """The float tables the model reads by row lookups, searched beside the kernels (none when
  `tables` is off or `embeddings` fixes their spec)."""
  if not options["tables"] or options["embeddings"] is not None:
    return []
  from jaxshrink.encoding import is_encoding
  from jaxshrink.quant.ptq import gather_tables
  from jaxshrink.quant.stage_tables import first_batch
  from jaxshrink.tree import flatten

  flat = flatten(pipeline.tree)
  uses = gather_tables(pipeline.model.apply, pipeline.tree, first_batch(pipeline))
  return sorted(p for p, use in uses.items()
                if use.rows and p not in paths and not is_encoding(flat.get(p)))  # fmt: skip


def _assemblable(point: Point, tables: list[str], by_name: dict, embeddings: Any) -> bool:
  """False for a point whose tables (or fixed `embeddings`) need a quantize stage and whose
  kernels are not quantized (`assignment_stages` refuses it)."""
  int_kernel = any(by_name[n].bits and not by_name[n].nm
                   for p, n in point.choice.items() if p not in tables)  # fmt: skip
  int_table = any(by_name[point.choice[t]].bits for t in tables)
  return int_kernel or not (int_table or embeddings is not None)


def _stored(point: Point, sensitivity: Any) -> int:
  """Total stored bytes of a frontier point (its cost may be time)."""
  return sensitivity.rest_bytes + sum(sensitivity.bytes[p][n] for p, n in point.choice.items())


def _time_vs_float(before: Pipeline, after: Pipeline, mode: str) -> float:
  """The assembled model's time in `mode` over the search's input model's, on one batch."""
  from jaxshrink import serving

  timing = serving.measure(
    after.model.apply, after.tree, before.tree, (timing_batch(before.dataset),), modes=(mode,),
    float_apply=serving_model(before.model).apply,
  )  # fmt: skip
  return timing.time_vs_float[mode]


def _max_bytes(value: Any, sensitivity: Any, names: list[str]) -> int | None:
  if value is None:
    return None
  if isinstance(value, str):
    if value not in names:
      raise UsageError(
        f"`max_bytes: {value}` of `search` names no candidate; give bytes, or one of {names}."
      )
    return sensitivity.rest_bytes + sum(by[value] for by in sensitivity.bytes.values())
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise UsageError(
      f"`max_bytes` of `search` must be bytes (an int) or a candidate; got {value!r}."
    )
  return value


def _bisect(points, verify, drop, budget, verified) -> tuple[Any, Any]:
  """The cheapest verified point within `drop`, bisecting `points` (least error first);
  `(None, None)` when even the first misses it."""

  def check(index: int) -> bool:
    if index not in verified:
      verified[index] = verify(points[index])
    return verified[index][1]["drop"] <= drop

  if not check(0):
    return None, None
  lo, hi = 0, len(points) - 1
  if hi > 0 and check(hi):
    lo = hi
  while hi - lo > 1 and len(verified) < budget:
    mid = (lo + hi) // 2
    if check(mid):
      lo = mid
    else:
      hi = mid
  return verified[lo]
