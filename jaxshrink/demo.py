"""`jaxshrink demo`: every technique on digits-cnn, exported, reloaded, measured.

Each demo method is an ordinary recipe, run through the same stage machinery,
export and load as `jaxshrink compress` and `jaxshrink eval`, so the demo
exercises exactly what users run. The float model is trained (or loaded from
the cache) once and shared by every method.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from jaxshrink import evaluation, export, recipes
from jaxshrink.report import format_bytes

MODEL = "digits-cnn"


@dataclasses.dataclass(frozen=True)
class DemoMethod:
  name: str
  stages: tuple[dict[str, Any], ...]
  quick: bool  # part of `demo --quick`


GRADUAL_90 = {
  "exclude": "conv1/kernel",
  "sparsity": 0.9,
  "allocation": "global",
  "method": "gradual",
  "steps": 400,
  "learning_rate": 0.002,
  "schedule": {"kind": "polynomial", "end": 200, "frequency": 20},
}

# Each technique adds its methods here; the float32 row is the reference.
METHODS: tuple[DemoMethod, ...] = (
  DemoMethod("float32", (), quick=True),
  DemoMethod("bf16 storage", ({"cast": {"dtype": "bfloat16"}},), quick=True),
  DemoMethod("fp16 storage", ({"cast": {"dtype": "float16"}},), quick=False),
  DemoMethod("W8A8 PTQ", ({"quantize": {"weight_bits": 8, "activation_bits": 8}},), quick=True),
  DemoMethod("int4 RTN g128", ({"quantize": {"weight_bits": 4, "group_size": 128}},), quick=True),
  DemoMethod(
    "int4 GPTQ",
    ({"quantize": {"method": "gptq", "weight_bits": 4, "calibration_batches": 4}},),
    quick=False,
  ),
  DemoMethod(
    "int8 QAT",
    ({"quantize": {"method": "qat", "weight_bits": 8, "activation_bits": 8, "steps": 100}},),
    quick=False,
  ),
  DemoMethod(
    "2:4 one-shot",
    ({"prune": {"exclude": "conv1/kernel", "structure": "2:4", "method": "oneshot"}},),
    quick=True,
  ),
  DemoMethod("gradual 90% pruning", ({"prune": GRADUAL_90},), quick=False),
  DemoMethod(
    "90% pruning + int8", ({"prune": {**GRADUAL_90, "quantize_nonzeros": 8}},), quick=False
  ),
  DemoMethod(
    "low-rank dense1 50%",
    ({"factorize": {"target": "dense1/kernel", "budget": 0.5, "finetune_steps": 300}},),
    quick=False,
  ),
  DemoMethod(
    "KD student (MLP)",
    (
      {
        "distill": {
          "student": "digits-student",
          "steps": 800,
          "temperature": 4.0,
          "alpha": 0.9,
        }
      },
    ),
    quick=False,
  ),
)


@dataclasses.dataclass(frozen=True)
class DemoRow:
  method: str
  metric: str
  value: float
  disk_bytes: int
  stored_bytes: int
  ratio: float  # the float32 checkpoint's disk bytes over this one's
  seconds: float


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def run_method(method: DemoMethod, base: recipes.Pipeline, out: Path) -> tuple[Path, Any]:
  """Runs one method's recipe on the shared float pipeline; exports it."""
  recipe = recipes.parse_recipe(
    {"name": method.name, "model": MODEL, "stages": list(method.stages)}, source="demo"
  )
  start = time.perf_counter()
  pipeline = recipes.run_stages(recipe, base)
  seconds = time.perf_counter() - start
  directory = export.save(
    out / _slug(method.name),
    pipeline.tree,
    model=pipeline.model_source,
    data=pipeline.model.data,
    recipe={**recipe.raw, "params": None},
    metrics={"seconds": round(seconds, 3)},
    overwrite=True,
  )
  return directory, pipeline


def run_demo(out: Path, *, quick: bool = False, console=None) -> list[DemoRow]:
  """Runs the demo; prints the table and writes `demo.json` and `demo.png` to `out`."""
  from rich.table import Table

  from jaxshrink.report import console as default_console

  console = console or default_console()
  out.mkdir(parents=True, exist_ok=True)
  methods = [m for m in METHODS if m.quick or not quick]
  console.print(f"[bold]jaxshrink demo[/bold]: {MODEL}, {len(methods)} methods -> {out}")
  base_recipe = recipes.parse_recipe({"model": MODEL}, source="demo")
  base = recipes.prepare(base_recipe, progress=True)

  rows: list[DemoRow] = []
  for method in methods:
    start = time.perf_counter()
    directory, pipeline = run_method(method, base, out)
    reloaded = export.load(directory)  # measure what was saved, not what is in memory
    value = evaluation.evaluate_tree(pipeline.model, reloaded, pipeline.dataset)
    disk = export.disk_bytes(directory)
    stored = export.read_manifest(directory)["totals"]["total_bytes"]
    rows.append(
      DemoRow(
        method.name, pipeline.model.metric, value, disk, stored, 0.0, time.perf_counter() - start
      )
    )
  float_disk = rows[0].disk_bytes
  rows = [dataclasses.replace(r, ratio=float_disk / r.disk_bytes) for r in rows]

  table = Table(title=f"{MODEL}: compressed, exported, reloaded and evaluated")
  columns = ("method", rows[0].metric, "stored params", "size on disk", "ratio", "seconds")
  for column in columns:
    table.add_column(column, justify="left" if column == "method" else "right")
  for r in rows:
    table.add_row(
      r.method,
      f"{r.value:.4f}",
      format_bytes(r.stored_bytes),
      format_bytes(r.disk_bytes),
      f"{r.ratio:.2f}x",
      f"{r.seconds:.1f}",
    )
  console.print(table)
  console.print(
    f"ratio: the float32 checkpoint's size on disk over each method's (both include the manifest "
    f"and orbax metadata); float32 reference {rows[0].metric} {rows[0].value:.4f}."
  )

  (out / "demo.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
  plot = _plot(rows, out / "demo.png")
  console.print(f"wrote {out / 'demo.json'} and {plot}")
  return rows


def _plot(rows: list[DemoRow], path: Path) -> Path:
  import matplotlib

  matplotlib.use("Agg")  # no display on servers and CI
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    ax.scatter(r.disk_bytes / 1024, r.value)
    ax.annotate(
      r.method,
      (r.disk_bytes / 1024, r.value),
      textcoords="offset points",
      xytext=(4, 4),
      fontsize=8,
    )
  ax.set_xscale("log")
  ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel("checkpoint size on disk (KiB, log scale)")
  ax.set_ylabel(rows[0].metric)
  ax.set_title(f"{MODEL}: {rows[0].metric} against size")
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
