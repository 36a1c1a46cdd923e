"""minilm: every compression recipe for the pretrained all-MiniLM-L6-v2, and Qwix side by side.

One row per `examples/recipes/minilm-*.yaml` recipe, run through the same machinery as
`jaxshrink compress`: mean and minimum cosine to the float embeddings on the 200 test
sentences of `minilm-sentences`, top-1 neighbour agreement, bytes on disk of the exported
checkpoint (`du` of the directory), ratio to the float32 checkpoint, compress seconds, and
inference time relative to the float model (W8A8 on the integer path; every ratio measured
interleaved with the float model in the same run). Qwix 0.1.8 PTQ rows quantize the same Flax
NNX module: int8 W8A8, int8 weight-only, int4 at tile 128 and 32.

Set `JAXSHRINK_MINILM_RECIPES=w8a8,int4-rtn-g128` to run a subset (a quick check).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.bench import Record, best_time

SUITE = "minilm"
DESCRIPTION = (
  "all-MiniLM-L6-v2 compressed by every technique (examples/recipes/minilm-*.yaml) and by Qwix "
  "PTQ on the same Flax model: mean/min cosine to the float embeddings, neighbour agreement, "
  "checkpoint bytes on disk, compress seconds, inference time relative to float."
)
RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
# (recipe stem after `minilm-`, row label); the order of the table.
METHODS = (
  ("w8a8", "W8A8 per-channel, dynamic per-token"),
  ("w8a8-shortest", "W8A8 shortest recipe (defaults, float tables)"),
  ("w8a8-smoothquant", "W8A8 SmoothQuant"),
  ("int4-rtn-g128", "int4 RTN g128"),
  ("int4-gptq-g128", "int4 GPTQ g128"),
  ("int4-awq-g128", "int4 AWQ g128"),
  ("int4-rtn-g32", "int4 RTN g32"),
  ("int4-gptq-g32", "int4 GPTQ g32"),
  ("int4-awq-g32", "int4 AWQ g32"),
  ("int3-gptq-g32", "int3 GPTQ g32"),
  ("prune50-magnitude", "50% magnitude"),
  ("prune50-wanda", "50% Wanda"),
  ("prune50-sparsegpt", "50% SparseGPT"),
  ("2of4-sparsegpt", "2:4 SparseGPT"),
  ("2of4-int4", "2:4 SparseGPT + int4"),
  ("lowrank-mlp", "low-rank MLP + distill fine-tune"),
  ("distill-l3", "3-layer student (distilled)"),
)
QWIX = (
  ("qwix W8A8", dict(weight_qtype="int8", act_qtype="int8")),
  ("qwix int8 weight-only", dict(weight_qtype="int8")),
  ("qwix int4 tile 128", dict(weight_qtype="int4", tile_size=128)),
  ("qwix int4 tile 32", dict(weight_qtype="int4", tile_size=32)),
)
TIMING_REPEATS = 5


def disk_bytes(path: Path) -> int:
  """Bytes on disk of a directory (`du -sb`, what a user sees)."""
  out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
  return int(out.stdout.split()[0])


def time_ratio(run, baseline, repeats: int = TIMING_REPEATS) -> float:
  """`best_time(run) / best_time(baseline)`, the two interleaved so load drifts hit both."""
  run(), baseline()  # compile both first
  best_run = best_base = float("inf")
  for _ in range(repeats):
    best_base = min(best_base, best_time(baseline, 1))
    best_run = min(best_run, best_time(run, 1))
  return round(best_run / best_base, 3)


def _selected() -> list[tuple[str, str]]:
  wanted = os.environ.get("JAXSHRINK_MINILM_RECIPES")
  if not wanted:
    return list(METHODS)
  names = {w.strip() for w in wanted.split(",") if w.strip()}
  return [m for m in METHODS if m[0] in names]


def _metrics_extra(metrics: dict) -> dict:
  return {
    "min_cosine": round(float(metrics["min_cosine"]), 4),
    "neighbour_agreement": round(float(metrics["neighbour_agreement"]), 4),
  }


def _recipe_row(stem, label, float_apply, params, batch, float_disk, tmp) -> Record:
  from jaxshrink import export
  from jaxshrink.quant import quantized_apply
  from jaxshrink.recipes import load_recipe, run_recipe

  recipe = load_recipe(RECIPES / f"minilm-{stem}.yaml")
  result = run_recipe(recipe, progress=False)
  pipe, metrics = result.pipeline, result.metrics
  out = Path(tmp) / stem
  export.save(out, pipe.tree, model=pipe.model_source, data=recipe.data or pipe.model.data)
  size = disk_bytes(out)
  run = jax.jit(quantized_apply(pipe.model.apply))
  ratio = time_ratio(lambda: run(pipe.tree, batch), lambda: float_apply(params, batch))
  compress_seconds = sum(stage["seconds"] for stage in metrics["stages"])
  return Record(
    SUITE, "minilm-l6", label, "cosine", round(float(metrics["value"]), 4), 1.0, size,
    float_disk, round(compress_seconds, 2),
    {**_metrics_extra(metrics), "recipe": f"minilm-{stem}.yaml",
     "disk_ratio": round(float_disk / size, 3), "inference_vs_float": ratio},
  )  # fmt: skip


def _qwix_rows(model, params, dataset, batch, float_apply, float_disk, tmp) -> list[Record]:
  import orbax.checkpoint as ocp
  import qwix
  from flax import nnx

  from jaxshrink import models

  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model.module(rngs=nnx.Rngs(0))))
  state = jax.tree.map(lambda leaf: leaf, abstract)
  nnx.replace_by_pure_dict(state, params)
  float_module = nnx.merge(graphdef, state)
  test_ids = jnp.asarray(dataset.x_test)
  rows = []
  for label, settings in QWIX:
    settings = {k: jnp.dtype(v) if k.endswith("qtype") else v for k, v in settings.items()}
    # Only the Dense layers' dot_general, like jaxshrink's `.*kernel` rule; the attention
    # score/context einsums stay float in both.
    rule = qwix.QuantizationRule(module_path=".*", op_names=("dot_general",), **settings)
    start = time.perf_counter()
    qmodule = qwix.quantize_model(float_module, qwix.PtqProvider([rule]), test_ids[:2])
    qgraph, qstate = nnx.split(qmodule)
    qstate = jax.block_until_ready(qstate)
    seconds = time.perf_counter() - start
    run = jax.jit(lambda s, x, g=qgraph: nnx.merge(g, s)(x))
    emb = np.asarray(run(qstate, test_ids))
    scores = models.embedding_metrics(emb, dataset.y_test)
    out = Path(tmp) / label.replace(" ", "_")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out.absolute(), nnx.to_pure_dict(qstate))
    checkpointer.wait_until_finished()
    size = disk_bytes(out)
    ratio = time_ratio(lambda r=run, s=qstate: r(s, batch), lambda: float_apply(params, batch))
    rows.append(Record(
      SUITE, "minilm-l6", label, "cosine", round(float(scores["mean_cosine"]), 4), 1.0, size,
      float_disk, round(seconds, 2),
      {"min_cosine": round(float(scores["min_cosine"]), 4),
       "neighbour_agreement": round(float(scores["neighbour_agreement"]), 4),
       "library": f"qwix {qwix.__version__}", "disk_ratio": round(float_disk / size, 3),
       "inference_vs_float": ratio},
    ))  # fmt: skip
  return rows


def run() -> list[Record]:
  from jaxshrink import export, models
  from jaxshrink.data import get_dataset

  model = models.get_model("minilm-l6")
  params = models.pretrained(model, progress=False)
  dataset = get_dataset(model.data)
  # Timing batch: 64 training sentences of 32 tokens (padding included, as served).
  batch = jnp.asarray(dataset.x_train[:64])
  float_apply = jax.jit(model.apply)
  records = []
  with tempfile.TemporaryDirectory() as tmp:
    export.save(Path(tmp) / "float", params, model="minilm-l6", data=model.data)
    float_disk = disk_bytes(Path(tmp) / "float")
    records.append(Record(
      SUITE, "minilm-l6", "float32", "cosine", 1.0, 1.0, float_disk, float_disk, 0.0,
      {"min_cosine": 1.0, "neighbour_agreement": 1.0, "disk_ratio": 1.0,
       "inference_vs_float": 1.0},
    ))  # fmt: skip
    for stem, label in _selected():
      records.append(_recipe_row(stem, label, float_apply, params, batch, float_disk, tmp))
    if not os.environ.get("JAXSHRINK_MINILM_SKIP_QWIX"):
      records += _qwix_rows(model, params, dataset, batch, float_apply, float_disk, tmp)
  return records


def _by_method(records) -> dict:
  return {r.method: r for r in records}


def _cos(rows: dict, label: str) -> float | None:
  row = rows.get(label)
  return None if row is None or row.value is None else float(row.value)


def _target(name: str, ok: bool, numbers: str, why_missed: str) -> str:
  if ok:
    return f"- **met** {name}: {numbers}."
  return f"- **missed** {name}: {numbers}. {why_missed}"


def summarize(records) -> str:
  """Each target of the real-model issue as met or missed, with the measured numbers."""
  rows = _by_method(records)
  lines = ["Targets (mean cosine to the float embeddings on the 200 test sentences):", ""]
  w8 = _cos(rows, "W8A8 per-channel, dynamic per-token")
  sq = _cos(rows, "W8A8 SmoothQuant")
  qw = _cos(rows, "qwix W8A8")
  if w8 is not None:
    best = max(v for v in (w8, sq) if v is not None)
    bar = max(0.997, qw or 0.0)
    lines.append(_target(
      "W8A8 >= 0.997 and at or above Qwix W8A8 from the same run", best >= bar,
      f"per-token {w8:.4f}, SmoothQuant {sq if sq is None else f'{sq:.4f}'}, Qwix "
      f"{qw if qw is None else f'{qw:.4f}'}",
      f"Shortfall {bar - best:.4f}: both quantize every Dense input per token to int8; the "
      "residual error is the int8 rounding of the FFN-output inputs (GELU outputs with a long "
      "tail).",
    ))  # fmt: skip
  rtn = _cos(rows, "int4 RTN g128")
  gptq, awq = _cos(rows, "int4 GPTQ g128"), _cos(rows, "int4 AWQ g128")
  if rtn is not None and (gptq is not None or awq is not None):
    best = max(v for v in (gptq, awq) if v is not None)
    lines.append(_target(
      "int4 GPTQ or AWQ at g128 >= 0.98 and above RTN g128", best >= 0.98 and best > rtn,
      f"GPTQ {gptq}, AWQ {awq}, RTN {rtn:.4f} (Qwix int4 tile 128: "
      f"{_cos(rows, 'qwix int4 tile 128')})",
      f"Shortfall {0.98 - best:.4f}, with every block calibrated sequentially toward the float "
      "model's outputs: groups of 32 (the g32 rows) are the next step.",
    ))  # fmt: skip
  g3 = _cos(rows, "int3 GPTQ g32")
  if g3 is not None:
    lines.append(_target(
      "3-bit GPTQ g32 >= 0.93", g3 >= 0.93, f"{g3:.4f}",
      f"Shortfall {0.93 - g3:.4f}: 8 levels per group leave the FFN output kernels' error "
      "beyond what the Hessian feedback recovers without fine-tuning.",
    ))  # fmt: skip
  sgpt, mag = _cos(rows, "50% SparseGPT"), _cos(rows, "50% magnitude")
  if sgpt is not None and mag is not None:
    lines.append(_target(
      "50% SparseGPT above 50% magnitude", sgpt > mag,
      f"SparseGPT {sgpt:.4f}, magnitude {mag:.4f}, Wanda {_cos(rows, '50% Wanda')}",
      "SparseGPT's weight update should beat plain magnitude; check the calibration set.",
    ))  # fmt: skip
  student = _cos(rows, "3-layer student (distilled)")
  if student is not None:
    lines.append(_target(
      "3-layer distilled student >= 0.95", student >= 0.95, f"{student:.4f}",
      f"Shortfall {0.95 - student:.4f} for the distillation alone: the student (teacher layers "
      "0, 4, 5) is distilled for the recipe's 150 steps of 32 sentences. The `recover` suite's "
      "`3-layer student + recover` row continues it on WordNet's usage examples "
      "(`minilm-distill-l3-recover.yaml`) and is the row the target is measured on.",
    ))  # fmt: skip
  if any(method.startswith("qwix") for method in rows):
    lines += ["", "Qwix rows are saved with orbax's `StandardCheckpointer`, which compresses "
              "chunks (the float32 embedding table included); jaxshrink checkpoints store raw "
              "arrays, and quantize the embedding tables where the recipe says so."]  # fmt: skip
  int8 = rows.get("W8A8 per-channel, dynamic per-token")
  if int8 is not None:
    lines += ["", f"BERT inference on the int8 path (W8A8, batch 64 x 32 tokens): "
              f"{int8.extra['inference_vs_float']:.2f}x the float32 time on this CPU."]  # fmt: skip
  return "\n".join(lines)


def plot(records, ax) -> None:
  """Mean cosine against bytes on disk (log x), one labelled point per method."""
  points = [r for r in records if r.value is not None and r.size_bytes]
  # Quantized rows crowd near cosine 1 at 48-59 MiB: their labels go in a column beside them,
  # joined to their points by thin lines; the rest are labelled in place.
  crowded = sorted((r for r in points if r.value >= 0.94 and r.method != "float32"),
                   key=lambda r: -r.value)  # fmt: skip
  column_x = 1.08 * max((r.size_bytes / 2**20 for r in crowded), default=1.0)
  for r in points:
    x, qwix = r.size_bytes / 2**20, r.method.startswith("qwix")
    ax.scatter(x, r.value, marker="s" if qwix else "o",
               color="tab:orange" if qwix else "tab:blue", s=22, zorder=3)  # fmt: skip
  for i, r in enumerate(crowded):
    line = {"arrowstyle": "-", "lw": 0.3, "alpha": 0.5}
    ax.annotate(r.method, (r.size_bytes / 2**20, r.value), xytext=(column_x, 1.004 - 0.0075 * i),
                fontsize=6, va="center", arrowprops=line)  # fmt: skip
  for r in points:
    if r not in crowded:
      ax.annotate(r.method, (r.size_bytes / 2**20, r.value), fontsize=6, xytext=(3, 2),
                  textcoords="offset points")  # fmt: skip
  ax.set_xscale("log")
  ax.set_xlabel("checkpoint on disk (MiB, log scale)")
  ax.set_ylabel("mean cosine to float embeddings")
  ax.set_title("all-MiniLM-L6-v2: jaxshrink recipes (circles) and Qwix PTQ (squares)")
  ax.grid(True, which="both", alpha=0.3)
