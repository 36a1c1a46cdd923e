"""serving: all-MiniLM-L6-v2 served by jaxshrink and by PyTorch, timed side by side.

For three batch shapes (batch x tokens = 64x32, 32x128, 1x128; random token ids in
[1000, 30000), fixed seed, no padding) one interleaved loop times, round-robin and best of
`ROUNDS` rounds of a fixed number of calls each:

- jaxshrink float32 (the baseline every ratio divides by): the zoo model's apply, jitted;
- every `examples/recipes/minilm-*.yaml` recipe, compressed once, saved with
  `jaxshrink.export.save`, loaded back with `jaxshrink.export.load` (as a user would), in the
  serving mode its checkpoint recorded (`metrics.serving.serving_mode`) and in every other mode
  that applies (`serving.modes_for`);
- PyTorch float32 `transformers.BertModel` on the same weights, and the same model through
  `torch.ao.quantization.quantize_dynamic` (int8 Linear layers), with the same mean pooling and
  L2 normalization and as many threads as JAX uses.

Each row records its time relative to jaxshrink float32 (and to both PyTorch rows), bytes on
disk (`du -sb` of the checkpoint; PyTorch: the file `torch.save(state_dict)` writes, the
peer's own format), and the memory it runs in: the compiled executable's argument + output +
temp bytes for jaxshrink, the parameter and buffer bytes for PyTorch. Fidelity rows (metric
`cosine`) hold each recipe's mean cosine to the float embeddings on the 200 `minilm-sentences`
test sentences in its recommended mode, and PyTorch's on the same token ids.

Set `JAXSHRINK_SERVING_RECIPES=w8a8,int4-gptq-g128` to run a subset (a quick check).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink import serving
from jaxshrink.bench import Record

# PyTorch's OpenMP threads spin while they wait; on a shared machine (other jobs on the same
# cores) a spinning thread holds a core another one needs, and a 1x128 batch took several times
# longer in trial runs. Passive waiting must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SUITE = "serving"
DESCRIPTION = (
  "all-MiniLM-L6-v2 served three ways at three batch shapes: jaxshrink float32, every "
  "examples/recipes/minilm-*.yaml checkpoint (saved, loaded back, in each serving mode) and "
  "PyTorch float32 / quantize_dynamic int8 on the same weights; time relative to jaxshrink "
  "float32 timed interleaved in the same loop, bytes on disk, memory, mean cosine."
)
MODEL = "minilm-l6"
SHAPES = ((64, 32), (32, 128), (1, 128))
TOKEN_RANGE = (1000, 30000)
SEED = 0
ROUNDS = 5
# Rounds for a shape whose float call takes over a second (32x128 on 2 cores): fewer, longer.
LONG_ROUNDS = 3
# Calls per timed round: about this many seconds of the float model (at least one call).
ROUND_SECONDS = 0.1
FLOAT = "jaxshrink float32"
TORCH_F32 = "torch float32"
TORCH_INT8 = "torch int8 (quantize_dynamic)"
TORCH = "torch"
PEERS_HINT = 'pip install -e ".[peers]"'
# The float PyTorch model must embed like ours, or the two are not the same model.
TORCH_MIN_COSINE = 0.9999
# Methods counted as 8-bit for target (b).
EIGHT_BIT = ("W8A8 per-channel, dynamic per-token", "W8A8 SmoothQuant")
W8A8 = EIGHT_BIT[0]
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def _minilm_suite():
  """benchmarks/minilm.py, loaded by path (it is not a package): its recipe table and `du`."""
  path = Path(__file__).with_name("minilm.py")
  spec = importlib.util.spec_from_file_location("jaxshrink_bench_minilm_for_serving", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def shape_name(shape: tuple[int, int]) -> str:
  return f"{shape[0]}x{shape[1]}"


def row_model(shape: tuple[int, int]) -> str:
  """The record `model` of a timing row: one model name per shape, so placeholders stay short."""
  return f"{MODEL} {shape_name(shape)}"


def cpu_flags() -> list[str]:
  """Which of `CPU_FLAGS` this CPU reports in /proc/cpuinfo (empty where it cannot be read)."""
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return []
  flags = set()
  for line in text.splitlines():
    if line.startswith("flags"):
      flags.update(line.split(":", 1)[1].split())
  return [f for f in CPU_FLAGS if f in flags]


def selected(methods) -> list[tuple[str, str]]:
  wanted = os.environ.get("JAXSHRINK_SERVING_RECIPES")
  if not wanted:
    return list(methods)
  names = {w.strip() for w in wanted.split(",") if w.strip()}
  return [m for m in methods if m[0] in names]


class Row(NamedTuple):
  """One timed configuration; `make(shape)` returns `(call, peak_bytes)` for that shape.

  A NamedTuple, not a dataclass: the runner loads suites by path, outside `sys.modules`.
  """

  method: str
  mode: str
  make: Callable[[tuple[int, int]], tuple[Callable[[], Any], int]]
  disk: int
  # The checkpoint's `metrics.serving` record (a recipe's row; None for float and peers):
  # the mode it recommends depends on the batch's row count (`serving.recorded_mode`).
  recorded: dict | None = None
  recipe: str | None = None
  library: str = "jaxshrink"
  mean_cosine: float | None = None  # fidelity in this row's mode, when it is recommended


def _jax_row_maker(apply: Callable, params: Any, batches: dict):
  """Compiles `apply(params, x)` for a shape; its memory is the executable's own."""

  def make(shape):
    x = batches[shape]
    compiled = jax.jit(apply).lower(params, x).compile()
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    return (lambda: compiled(params, x)), int(peak)

  return make


# ---------------------------------------------------------------- PyTorch peer


def _torch_tensors_bytes(value: Any) -> int:
  """Bytes of every tensor in a (nested) state_dict value; packed int8 weights included."""
  import torch

  if isinstance(value, torch.Tensor):
    return value.numel() * value.element_size()
  if isinstance(value, (tuple, list)):
    return sum(_torch_tensors_bytes(v) for v in value)
  if isinstance(value, dict):
    return sum(_torch_tensors_bytes(v) for v in value.values())
  return 0


def _torch_peers(tmp: Path) -> dict | None:
  """`{label: (module, disk bytes)}` for PyTorch float32 and quantize_dynamic int8, or None."""
  try:
    import torch
    import transformers
  except ImportError:
    print(f"serving: torch/transformers not installed ({PEERS_HINT}); skipping the torch rows.")
    return None
  from jaxshrink.models.minilm import minilm_files

  torch.set_num_threads(os.cpu_count() or 1)
  model = transformers.BertModel.from_pretrained(str(minilm_files()), add_pooling_layer=False)
  model.eval()
  quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
  peers = {}
  for label, module in ((TORCH_F32, model), (TORCH_INT8, quantized)):
    path = tmp / f"{label.split()[1]}.pt"
    torch.save(module.state_dict(), path)  # the peer's format, measured for the peer only
    peers[label] = (module, path.stat().st_size)
  return peers


def torch_embed(module, ids):
  """Mean-pooled, L2-normalized embeddings, as `BertEncoder` computes them ([PAD] = 0)."""
  import torch

  with torch.inference_mode():
    mask = ids != 0
    hidden = module(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _torch_row_maker(module, batches: dict):
  import torch

  peak = sum(_torch_tensors_bytes(v) for v in module.state_dict().values())

  def make(shape):
    ids = torch.from_numpy(np.asarray(batches[shape], np.int64))
    return (lambda: torch_embed(module, ids)), peak

  return make


def _torch_fidelity(module, dataset) -> dict[str, float]:
  import torch

  from jaxshrink import models

  ids = torch.from_numpy(np.asarray(dataset.x_test, np.int64))
  embeddings = np.concatenate([torch_embed(module, chunk).numpy() for chunk in ids.split(64)])
  return models.embedding_metrics(embeddings, dataset.y_test)


# ---------------------------------------------------------------- timing


def _wait(out: Any) -> Any:
  return jax.block_until_ready(out) if isinstance(out, jax.Array) else out


def time_interleaved(calls: dict[str, Callable[[], Any]], baseline: str) -> dict[str, float]:
  """Best seconds per call of each function, timed round-robin in one loop.

  Every function runs once first (compiled, warmed); a round then runs each one `n` times in
  turn, `n` fixed for all from the baseline's time, and each keeps its best round (`ROUNDS`, or
  `LONG_ROUNDS` when one baseline call takes over a second).
  """
  for call in calls.values():
    _wait(call())
  start = time.perf_counter()
  _wait(calls[baseline]())
  seconds = time.perf_counter() - start
  n = max(1, min(50, round(ROUND_SECONDS / max(seconds, 1e-6))))
  best = dict.fromkeys(calls, float("inf"))
  for _ in range(LONG_ROUNDS if seconds > 1.0 else ROUNDS):
    for name, call in calls.items():
      start = time.perf_counter()
      for _ in range(n):
        out = call()
      _wait(out)
      best[name] = min(best[name], (time.perf_counter() - start) / n)
  return best


# ---------------------------------------------------------------- recipes


def _compress(stem: str, tmp: Path, recipes_dir: Path, dataset, disk_bytes):
  """Compresses, saves and loads one recipe; returns its rows and its fidelity record."""
  from jaxshrink import export
  from jaxshrink.recipes import evaluate_metrics, load_recipe, run_recipe

  recipe = load_recipe(recipes_dir / f"minilm-{stem}.yaml")
  result = run_recipe(recipe, progress=False)
  pipe = result.pipeline
  out = tmp / stem
  export.save(
    out, pipe.tree, model=pipe.model_source, data=recipe.data or pipe.model.data,
    recipe={**recipe.raw, "params": recipe.params}, metrics=result.metrics,
  )  # fmt: skip
  model = pipe.model  # a distilled student runs its own apply
  del pipe, result
  recorded = export.read_manifest(out)["metrics"]["serving"]
  recommended = serving.recorded_mode(recorded, SHAPES[0][0])  # the batch mode
  tree = export.load(out)
  size = disk_bytes(out)
  served = {m: serving.serve(model.apply, tree, m) for m in serving.modes_for(tree)}
  # Fidelity in each mode a shape is served in (bf16 matmuls round differently from float).
  by_mode = {}
  for mode in dict.fromkeys(serving.recorded_mode(recorded, s[0]) for s in SHAPES):
    scores = evaluate_metrics(
      dataclasses.replace(model, apply=served[mode].apply), served[mode].params, dataset,
      served=True,
    )  # fmt: skip
    by_mode[mode] = {k: round(float(scores[k]), 4)
                     for k in ("value", "min_cosine", "neighbour_agreement")}  # fmt: skip
  fidelity = {
    "mode": recommended,
    "mean_cosine": by_mode[recommended]["value"],
    "min_cosine": by_mode[recommended]["min_cosine"],
    "neighbour_agreement": by_mode[recommended]["neighbour_agreement"],
    "mean_cosine_by_mode": {m: v["value"] for m, v in by_mode.items()},
    "recipe": f"minilm-{stem}.yaml",
    "recorded_time_vs_float_by_mode": recorded.get("time_vs_float_by_mode"),
    "recorded_single": recorded.get("single"),
  }
  return served, recorded, size, fidelity


def run() -> list[Record]:
  from jaxshrink import export, models
  from jaxshrink.data import get_dataset

  minilm = _minilm_suite()
  model = models.get_model(MODEL)
  params = models.pretrained(model, progress=False)
  dataset = get_dataset(model.data)
  rng = np.random.default_rng(SEED)
  batches = {s: jnp.asarray(rng.integers(*TOKEN_RANGE, size=s), jnp.int32) for s in SHAPES}
  flags = cpu_flags()
  records: list[Record] = []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    export.save(tmp / "float", params, model=MODEL, data=model.data)
    float_disk = minilm.disk_bytes(tmp / "float")
    rows = [Row(FLOAT, "float", _jax_row_maker(model.apply, params, batches), float_disk)]
    fidelity_records = []
    for stem, label in selected(minilm.METHODS):
      served, recorded, size, fidelity = _compress(
        stem, tmp, minilm.RECIPES, dataset, minilm.disk_bytes
      )
      fidelity_records.append(Record(
        SUITE, MODEL, label, "cosine", fidelity["mean_cosine"], 1.0, size, float_disk, None,
        {**fidelity, "disk_bytes": size},
      ))  # fmt: skip
      for mode, s in served.items():
        rows.append(Row(
          label, mode, _jax_row_maker(s.apply, s.params, batches), size, recorded=recorded,
          recipe=fidelity["recipe"], mean_cosine=fidelity["mean_cosine_by_mode"].get(mode),
        ))  # fmt: skip
      gc.collect()
    peers = _torch_peers(tmp)
    note = None
    if peers is None:
      note = f"torch rows skipped: torch/transformers not installed ({PEERS_HINT})"
    else:
      for label, (module, size) in peers.items():
        rows.append(Row(label, "torch", _torch_row_maker(module, batches), size, library=TORCH))
        scores = _torch_fidelity(module, dataset)
        if label == TORCH_F32 and scores["min_cosine"] < TORCH_MIN_COSINE:
          raise RuntimeError(
            f"PyTorch float32 embeds the test sentences at min cosine {scores['min_cosine']:.6f}"
            f" to jaxshrink float32 (< {TORCH_MIN_COSINE}); the two models differ, so timing "
            "them side by side would compare different work."
          )
        fidelity_records.append(Record(
          SUITE, MODEL, label, "cosine", round(float(scores["mean_cosine"]), 4), 1.0, size,
          float_disk, None,
          {"mode": "torch", "mean_cosine": round(float(scores["mean_cosine"]), 4),
           "min_cosine": round(float(scores["min_cosine"]), 4),
           "neighbour_agreement": round(float(scores["neighbour_agreement"]), 4),
           "disk_bytes": size},
        ))  # fmt: skip
    for shape in SHAPES:
      records += _shape_records(rows, shape, fidelity_records, float_disk, flags, note)
      gc.collect()
    records += fidelity_records
  return records


def _key(row: Row) -> str:
  return f"{row.method} [{row.mode}]"


def _shape_records(rows, shape, fidelity_records, float_disk, flags, note) -> list[Record]:
  made = {_key(r): r.make(shape) for r in rows}
  best = time_interleaved({k: call for k, (call, _) in made.items()}, _key(rows[0]))
  base = best[_key(rows[0])]
  torch_f32 = best.get(f"{TORCH_F32} [torch]")
  torch_int8 = best.get(f"{TORCH_INT8} [torch]")
  cosine = {r.method: r.value for r in fidelity_records}
  cosine[FLOAT] = 1.0
  records = []
  for row in rows:
    seconds = best[_key(row)]
    recommended = (
      None if row.recorded is None else row.mode == serving.recorded_mode(row.recorded, shape[0])
    )
    extra = {
      "shape": shape_name(shape),
      "ms": round(seconds * 1e3, 3),
      "mode": row.mode,
      "recommended": recommended,
      "time_vs_torch_int8": None if torch_int8 is None else round(seconds / torch_int8, 4),
      "time_vs_torch_f32": None if torch_f32 is None else round(seconds / torch_f32, 4),
      "disk_bytes": row.disk,
      "ratio_disk": round(float_disk / row.disk, 3),
      "peak_bytes": made[_key(row)][1],
      "library": row.library,
    }
    if row.recipe:
      extra["recipe"] = row.recipe
    if recommended is not False:  # fidelity was measured in each recommended mode
      extra["mean_cosine"] = cosine.get(row.method) if row.mean_cosine is None else row.mean_cosine
    if row.library == TORCH:
      extra["threads"] = os.cpu_count()
      extra["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    if row.method == FLOAT:
      extra["cpu_flags"] = " ".join(flags) or "unknown"
      if note:
        extra["note"] = note
    records.append(Record(
      SUITE, row_model(shape), row.method, "time_vs_float", round(seconds / base, 4), 1.0,
      row.disk, float_disk, None, extra,
    ))  # fmt: skip
  return records


# ---------------------------------------------------------------- summary


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
  return "–" if value is None else f"{value:{spec}}{suffix}"


def _timing(records) -> dict[str, list[Record]]:
  """Timing records by shape name, in the order they were measured."""
  out: dict[str, list[Record]] = {}
  for r in records:
    if r.metric == "time_vs_float":
      out.setdefault(r.extra["shape"], []).append(r)
  return out


def _shown(rows: list[Record]) -> list[Record]:
  """The rows of a shape's table: the baselines and each recipe's recommended mode."""
  return [r for r in rows if r.extra.get("recommended") is not False]


def table(rows: list[Record], cosines: dict[str, float]) -> list[str]:
  """Markdown table of one shape: baselines, then each recipe in its recommended mode."""
  others: dict[str, list[str]] = {}
  for r in rows:
    if r.extra.get("recommended") is False:
      others.setdefault(r.method, []).append(f"{r.extra['mode']} {r.value:.2f}")
  lines = [
    "| row | mode | time vs float | vs torch int8 | MiB on disk | mean cos | other modes |",
    "|---|---|---|---|---|---|---|",
  ]
  order = {TORCH_F32: 0, TORCH_INT8: 1, FLOAT: 2}
  for r in sorted(_shown(rows), key=lambda r: order.get(r.method, 3)):
    lines.append(
      f"| {r.method} | {r.extra['mode']} | {r.value:.2f} | "
      f"{_fmt(r.extra.get('time_vs_torch_int8'))} | {r.extra['disk_bytes'] / 2**20:.1f} | "
      f"{_fmt(r.extra.get('mean_cosine', cosines.get(r.method)), '.4f')} | "
      f"{', '.join(others.get(r.method, [])) or '–'} |"
    )
  return lines


def _verdict(ok: bool) -> str:
  return "**met**" if ok else "**missed**"


def summarize(records) -> str:
  """A table per shape, then the serving targets met or missed with the measured numbers."""
  by_shape = _timing(records)
  cosines = {r.method: r.value for r in records if r.metric == "cosine"}
  cosines[FLOAT] = 1.0
  lines = []
  for shape, rows in by_shape.items():
    lines += [f"Batch x tokens {shape} (time relative to jaxshrink float32, same loop):", ""]
    lines += table(rows, cosines) + [""]
  flags = next(
    (r.extra.get("cpu_flags") for rs in by_shape.values() for r in rs if r.method == FLOAT), None
  )
  lines += ["Targets:", ""]
  # (a) W8A8 <= 0.6x float at 64x32 and 32x128.
  w8 = {
    s: r for s, rs in by_shape.items() for r in rs if r.method == W8A8 and r.extra["recommended"]
  }
  if w8:
    shown = [s for s in ("64x32", "32x128") if s in w8]
    ok = all(w8[s].value <= 0.6 for s in shown)
    numbers = ", ".join(f"{w8[s].value:.2f}x at {s} ({w8[s].extra['mode']})" for s in shown)
    integer = {
      s: r.value for s, rs in by_shape.items() for r in rs
      if r.method == W8A8 and r.extra["mode"] == "integer"
    }  # fmt: skip
    lines.append(
      f"- (a) W8A8 at or below 0.6x the float32 time at 64x32 and 32x128: {_verdict(ok)}: "
      f"{numbers}; the integer path alone: "
      + ", ".join(f"{v:.2f}x at {s}" for s, v in integer.items())
      + "."
      + ("" if ok else f" {_why_int8(flags)}")
    )
  # (b) best jaxshrink 8-bit vs torch quantize_dynamic at every shape.
  per_shape = {}
  for shape, rows in by_shape.items():
    eight = [r for r in rows if r.method in EIGHT_BIT and r.extra.get("time_vs_torch_int8")]
    if eight:
      per_shape[shape] = min(eight, key=lambda r: r.value)
  if per_shape:
    ok = all(r.extra["time_vs_torch_int8"] <= 1.0 for r in per_shape.values())
    numbers = "; ".join(
      f"{s}: {r.extra['time_vs_torch_int8']:.2f}x torch int8's time ({r.method}, {r.extra['mode']})"
      for s, r in per_shape.items()
    )
    lines.append(
      f"- (b) best jaxshrink 8-bit at or below torch quantize_dynamic's time at every shape: "
      f"{_verdict(ok)}: {numbers}."
      + ("" if ok else " quantize_dynamic calls FBGEMM, whose int8 GEMM kernels are written for "
         "AVX2; on this CPU jaxshrink's integer path ran near float32 speed (target (a)).")
    )  # fmt: skip
  elif by_shape:
    lines.append("- (b) not measured: no torch rows in this run.")
  # (c) no recommended row slower than float.
  recommended = [r for rs in by_shape.values() for r in rs if r.extra.get("recommended")]
  if recommended:
    slow = [r for r in recommended if r.value > 1.0]
    as_float = [r for r in slow if _is_float_computation(r, by_shape[r.extra["shape"]])]
    others = [r for r in slow if r not in as_float]
    text = (
      f"- (c) no recipe's recommended mode slower than float32 (ratio <= 1.0) at any shape: "
      f"{_verdict(not slow)}: {len(slow)} of {len(recommended)} recommended rows above 1.0"
    )
    if as_float:
      text += (
        f"; {len(as_float)} of them run `decode-once`, the float32 computation itself, at "
        f"{min(r.value for r in as_float):.2f}-{max(r.value for r in as_float):.2f}x (noise, "
        "see below)"
      )
    if others:
      text += "; the others: " + "; ".join(
        f"{r.method} ({r.extra['mode']}) {r.value:.2f}x at {r.extra['shape']}" for r in others
      )
    lines.append(text + ("." if not slow else f". {_why_slow(flags)}"))
  noise = _noise(by_shape)
  if noise:
    lines += ["", "Timing noise: a `decode-once` row of the full model runs exactly the float32 "
              "computation on decoded params, so those rows' spread around 1.0 is this run's "
              "noise on a shared machine: " + "; ".join(noise) + "."]  # fmt: skip
  threads = next((r.extra for rs in by_shape.values() for r in rs if "threads" in r.extra), None)
  if threads:
    lines += ["", f"PyTorch ran {threads['threads']} threads with OMP_WAIT_POLICY="
              f"{threads.get('omp_wait_policy')}: spinning OpenMP threads on this shared machine "
              "made a 1x128 batch several times slower in a trial run; a passive wait costs a "
              "wake-up per parallel region, which weighs most at 1x128 (quantize_dynamic adds a "
              "quantize step per Linear)."]  # fmt: skip
  if flags is not None:
    lines += ["", f"CPU flags of this run (of {', '.join(CPU_FLAGS)}): {flags}."]
  return "\n".join(lines)


def _why_int8(flags: str | None) -> str:
  missing = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f not in (flags or "")]
  if len(missing) < 3:
    return "The CPU has an int8 dot instruction; the shortfall is in the lowering."
  return (
    "This CPU has no int8 dot-product instructions (no VNNI, no AMX): XLA:CPU widens int8 dots "
    "and runs them at about float32 speed, and the per-token activation quantization is extra "
    "work on top."
  )


def _why_slow(flags: str | None) -> str:
  chosen = (
    "`jaxshrink compress` chose each recipe's modes on the test sentences: one for a batch (64 "
    "rows, padding included) and one for a single request (one row), and a shape's recommended "
    "mode is the one measured nearest its row count (`serving.recorded_mode`)"
  )
  if any(f in (flags or "") for f in ("avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni")):
    return (
      f"{chosen}. This CPU has bf16/int8 dot instructions, so for batches the `bfloat16` and "
      "`integer` modes run well below float32; a single sentence is too little work to hide "
      "what a mode does in every call besides the matmuls, and a choice made on a short test "
      "sentence can lose on a 128-token one."
    )
  return (
    f"{chosen}; on a CPU without int8/bf16 dot instructions no mode is much faster than float32, "
    "so the choice is a near-tie that timing noise can decide (see the noise line below)."
  )


def _is_float_computation(row: Record, rows: list[Record]) -> bool:
  """A `decode-once` row of the float model's own shapes (same executable memory as float32);
  a distilled student's decode-once row is a smaller model, not a re-timing of float."""
  float_peak = next((r.extra.get("peak_bytes") for r in rows if r.method == FLOAT), None)
  return row.extra.get("mode") == "decode-once" and row.extra.get("peak_bytes") == float_peak


def _noise(by_shape) -> list[str]:
  """Float-computation ratios per shape (`min-max over N rows`): float32 re-timed."""
  out = []
  for shape, rows in by_shape.items():
    ratios = [r.value for r in rows if _is_float_computation(r, rows)]
    if ratios:
      out.append(f"{min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} rows at {shape}")
  return out


def plot(records, ax) -> None:
  """Time relative to float32 against MiB on disk at 32x128, one labelled point per row."""
  rows = [r for r in _timing(records).get("32x128", []) if r.extra.get("recommended") is not False]
  for r in rows:
    torch_row = r.extra.get("library") == "torch"
    x, y = r.value, r.extra["disk_bytes"] / 2**20
    ax.scatter(x, y, marker="s" if torch_row else "o",
               color="tab:orange" if torch_row else "tab:blue", s=22, zorder=3)  # fmt: skip
  # Quantized rows sit in clusters (about 12, 22 and 67 MiB): a label near an earlier one is
  # stacked below it instead of printed over it.
  placed: list[tuple[float, float]] = []
  for r in sorted(rows, key=lambda r: (-r.extra["disk_bytes"], r.value)):
    x, y = r.value, r.extra["disk_bytes"] / 2**20
    near = sum(abs(x - px) < 0.12 and abs(y - py) < 4 for px, py in placed)
    placed.append((x, y))
    ax.annotate(r.method, (x, y), fontsize=6, xytext=(4, 2 - 7 * near),
                textcoords="offset points", va="center")  # fmt: skip
  ax.axvline(1.0, color="grey", lw=0.6, ls="--")
  ax.set_xlabel("time relative to jaxshrink float32 (batch 32 x 128 tokens)")
  ax.set_ylabel("on disk (MiB)")
  ax.set_title(
    "all-MiniLM-L6-v2 at 32x128: jaxshrink (circles, recommended mode), PyTorch (squares)",
    fontsize=9,
  )
  ax.margins(x=0.3, y=0.08)  # room for the labels right of the points
  ax.set_ylim(bottom=min(ax.get_ylim()[0], -2.0))  # and for those stacked below the lowest
  ax.grid(True, alpha=0.3)
