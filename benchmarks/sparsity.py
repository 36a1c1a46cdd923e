"""Sparsity suite: accuracy vs sparsity, 2:4, tiny-lm one-shot pruning, wrapper overhead,
shrink speed (channels on digits-cnn, heads on tiny-lm) and bytes on disk.

The parts take from seconds (bytes) to most of an hour (accuracy: 17 fine-tuning runs). To
rerun some of them, name them in `JAXSHRINK_SPARSITY_PARTS` (comma-separated, from `PARTS`);
the stored rows of the other parts are kept:

    JAXSHRINK_SPARSITY_PARTS=heads,shrink jaxshrink bench --suite sparsity
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax

import jaxshrink.sparsity.stage  # noqa: F401
from jaxshrink import data, models
from jaxshrink.bench import DIGITS_TEST_IMAGES, RESULTS, Record, best_time, digits_images
from jaxshrink.export import disk_bytes, save
from jaxshrink.models import cross_entropy_loss
from jaxshrink.pipeline import Pipeline
from jaxshrink.recipes import evaluate_tree
from jaxshrink.report import tree_report
from jaxshrink.sparsity import (
  NM,
  Heads,
  Pruner,
  encode_sparse,
  oneshot_prune,
  polynomial_schedule,
  pruned_masks,
  pruning,
  shrink_model,
  sparsegpt,
  wanda,
)
from jaxshrink.sparsity.stage import PRUNE_OPTIONS, prune_stage
from jaxshrink.tree import Rule

SUITE = "sparsity"
DESCRIPTION = (
  "digits-cnn accuracy vs sparsity (conv1 kept dense) for one-shot magnitude, gradual "
  "polynomial, gradual global magnitude and RigL (400 fine-tuning steps); 2:4; tiny-lm "
  "perplexity at 50% and 2:4 for magnitude, Wanda, SparseGPT (all block kernels); wrapper "
  "step-time overhead and shrink inference-time ratio, interleaved best-of; bytes on disk "
  "(every checkpoint file) for 90%, 2:4 and 2:4 + int4; tiny-lm with 2 of 4 heads per block "
  "pruned and shrunk: inference time and perplexity against the masked model, and pruned "
  "gradually over 200 fine-tuning steps before shrinking."
)
HEAD_STEPS = 200
PARTS = ("overhead", "shrink", "heads", "bytes", "accuracy", "tiny-lm")
SPARSITIES = (0.5, 0.75, 0.9, 0.95)
STEPS = 400
# The stored rows pick their layers by rule alone (no size rule: dense2 is pruned too).
CNN_RULE = {"target": ".*kernel", "exclude": "conv1/kernel", "keep_dense_below": 0}


def _pipeline(name):
  model = models.get_model(name)
  params = models.pretrained(model, progress=False)
  return Pipeline(model, data.get_dataset(model.data), model, params, params, jax.random.key(0))


def _stage(pipeline, **options):
  start = time.perf_counter()
  out = prune_stage(pipeline, {**PRUNE_OPTIONS, **CNN_RULE, **options})
  return out, time.perf_counter() - start


def _record(model, method, metric, value, ref, tree, seconds, **extra):
  rep = tree_report(tree)
  return Record(SUITE, model, method, metric, value, ref, rep.total_bytes, rep.float32_bytes,
                seconds, extra)  # fmt: skip


def _accuracy_rows(pipeline, base):
  rows = []
  gradual = {"method": "gradual", "steps": STEPS, "learning_rate": 2e-3,
             "schedule": {"kind": "polynomial", "end": STEPS // 2, "frequency": 20}}  # fmt: skip
  methods = {
    "oneshot magnitude": {"method": "oneshot"},
    "gradual polynomial": gradual,
    "gradual global magnitude": {**gradual, "allocation": "global"},
    "rigl (erk)": {"method": "rigl", "steps": STEPS, "learning_rate": 2e-3, "allocation": "erk"},
  }
  for sparsity in SPARSITIES:
    for method, options in methods.items():
      out, seconds = _stage(pipeline, sparsity=sparsity, **options)
      acc = evaluate_tree(pipeline.model, out.tree, pipeline.dataset)
      rows.append(_record("digits-cnn", f"{method} {sparsity:.0%}", "accuracy", acc, base,
                          out.tree, seconds, sparsity=sparsity))  # fmt: skip
  out, seconds = _stage(pipeline, structure="2:4", method="gradual", steps=150,
                        schedule={"kind": "oneshot"})  # fmt: skip
  acc = evaluate_tree(pipeline.model, out.tree, pipeline.dataset)
  rows.append(_record("digits-cnn", "2:4 + 150 fine-tune steps", "accuracy", acc, base, out.tree,
                      seconds))  # fmt: skip
  return rows


def _bytes_rows(pipeline):
  rows = []
  f32 = tree_report(pipeline.tree).float32_bytes
  rule = Rule(".*kernel", exclude="conv1/kernel")
  pruned90 = oneshot_prune(pipeline.tree, Pruner(rule, 0.9, allocation="global"))
  pruned24 = oneshot_prune(pipeline.tree, Pruner(rule, structure="2:4"))
  masks24 = pruned_masks(pruned24, Pruner(rule, structure="2:4"))
  variants = {
    "float32": pipeline.tree,
    "90% bitmask": encode_sparse(pruned90, rule),
    "90% bitmask + int8": encode_sparse(pruned90, rule, quantize_nonzeros=8),
    "2:4": encode_sparse(pruned24, rule, structure=NM(2, 4), masks=masks24),
    "2:4 + int4": encode_sparse(
      pruned24, rule, structure=NM(2, 4), masks=masks24, quantize_nonzeros=4
    ),  # fmt: skip
  }
  with tempfile.TemporaryDirectory() as tmp:
    for name, tree in variants.items():
      path = save(Path(tmp) / name.replace(" ", "_").replace("%", "").replace(":", "-"), tree)
      size = disk_bytes(path)
      rows.append(Record(SUITE, "digits-cnn", name, "disk_bytes", float(size), None, size, f32,
                         None, {"ratio_vs_float32": round(f32 / size, 2)}))  # fmt: skip
  return rows


def _overhead_row(pipeline):
  model, params, ds = pipeline.model, pipeline.tree, pipeline.dataset
  x, y = ds.x_train[:64], ds.y_train[:64]
  plain = optax.adam(1e-3)
  wrapped = pruning(optax.adam(1e-3), Pruner(Rule(".*kernel", exclude="conv1/kernel"), 0.9),
                    polynomial_schedule(0, 1000, 100))  # fmt: skip

  def make(tx):
    @jax.jit
    def step(p, s):
      g = jax.grad(lambda p: cross_entropy_loss(model.apply(p, x), y))(p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    state = [params, tx.init(params)]
    state = list(step(*state))  # compile; step 0 is a mask update
    state = list(step(*state))

    def run(n=20):
      for _ in range(n):
        state[:] = step(*state)
      return state[0]

    return run

  runs = {"plain": make(plain), "wrapped": make(wrapped)}
  times = {"plain": float("inf"), "wrapped": float("inf")}
  for _ in range(3):
    for name, run in runs.items():
      times[name] = min(times[name], best_time(run, 2))
  ratio = times["wrapped"] / times["plain"]
  return Record(SUITE, "digits-cnn", "pruning wrapper step (no mask update)", "step_time_ratio",
                ratio, 1.0, None, None, times["wrapped"] / 20,
                {"plain_step_s": times["plain"] / 20, "goal": "<= 1.15"})  # fmt: skip


def _shrink_row(pipeline):
  options = {"target": "(conv1|conv2|dense1)/kernel", "exclude": None, "structure": "channel",
             "sparsity": 0.75, "method": "oneshot", "keep_dense_below": 0}  # fmt: skip
  masked, _ = _stage(pipeline, **options, encode=False)
  masks = Pruner("(conv1|conv2|dense1)/kernel", 0.75, structure="channel").masks(pipeline.tree)
  small, small_model = shrink_model(pipeline.model, masked.tree, masks)
  x = pipeline.dataset.x_test[:256]
  big_fn = jax.jit(pipeline.model.apply)
  small_fn = jax.jit(small_model.apply)
  big_fn(masked.tree, x), small_fn(small, x)
  t_big = t_small = float("inf")
  for _ in range(3):
    t_big = min(t_big, best_time(lambda: big_fn(masked.tree, x)))
    t_small = min(t_small, best_time(lambda: small_fn(small, x)))
  diff = float(np.abs(np.asarray(big_fn(masked.tree, x)) - np.asarray(small_fn(small, x))).max())
  acc = evaluate_tree(small_model, small, pipeline.dataset)
  return Record(SUITE, "digits-cnn", "channel 75% + shrink", "inference_time_ratio",
                t_small / t_big, 1.0, tree_report(small).total_bytes,
                tree_report(pipeline.tree).float32_bytes, t_small,
                {"accuracy": acc, "max_abs_diff_vs_masked": diff})  # fmt: skip


def _tiny_lm_rows():
  model = models.get_model("tiny-lm")
  params = models.pretrained(model, progress=False)
  ds = data.get_dataset(model.data)
  batches = [ds.x_train[i : i + 32] for i in range(0, 256, 32)]
  base = models.evaluate(model, params, ds)
  rule = Rule(r"block_\d+/.*/kernel")
  rows = []
  for structure in ("unstructured", "2:4"):
    pruner = Pruner(rule, 0.5, structure=structure)
    for method, fn in (
      ("magnitude", lambda p=pruner: oneshot_prune(params, p)),
      ("wanda", lambda p=pruner: wanda(model.apply, params, batches, p)),
      (
        "wanda per-output",
        lambda p=pruner: wanda(model.apply, params, batches, p, comparison="output"),
      ),
      ("sparsegpt", lambda p=pruner: sparsegpt(model.apply, params, batches, p)),
    ):
      start = time.perf_counter()
      pruned = fn()
      seconds = time.perf_counter() - start
      ppl = models.evaluate(model, pruned, ds)
      label = "50%" if structure == "unstructured" else "2:4"
      rows.append(_record("tiny-lm", f"{method} {label}", "perplexity", ppl, base, pruned,
                          seconds))  # fmt: skip
  return rows


def _heads_row():
  model = models.get_model("tiny-lm")
  params = models.pretrained(model, progress=False)
  ds = data.get_dataset(model.data)
  start = time.perf_counter()
  pruner = Pruner(r".*attention/.*/kernel", 0.5, structure=Heads(4))
  masked = oneshot_prune(params, pruner)
  masks = pruned_masks(masked, pruner)
  small, small_model = shrink_model(model, masked, masks, structure="heads")
  seconds = time.perf_counter() - start
  x = ds.x_test[:32]
  big_fn, small_fn = jax.jit(model.apply), jax.jit(small_model.apply)
  big_fn(masked, x), small_fn(small, x)
  t_big = t_small = float("inf")
  for _ in range(3):
    t_big = min(t_big, best_time(lambda: big_fn(masked, x)))
    t_small = min(t_small, best_time(lambda: small_fn(small, x)))
  diff = float(np.abs(np.asarray(big_fn(masked, x)) - np.asarray(small_fn(small, x))).max())
  return Record(SUITE, "tiny-lm", "heads 50% (2 of 4 per block) + shrink", "inference_time_ratio",
                t_small / t_big, 1.0, tree_report(small).total_bytes,
                tree_report(params).float32_bytes, seconds,
                {"perplexity": models.evaluate(small_model, small, ds),
                 "perplexity_masked": models.evaluate(model, masked, ds),
                 "float_perplexity": models.evaluate(model, params, ds),
                 "max_abs_diff_vs_masked": diff, "shrunk_model": small_model.name})  # fmt: skip


def _heads_finetuned_row():
  """Heads pruned gradually while fine-tuning, then shrunk: what the smaller model keeps."""
  pipeline = _pipeline("tiny-lm")
  options = {"target": r".*attention/.*/kernel", "structure": "heads", "sparsity": 0.5,
             "method": "gradual", "steps": HEAD_STEPS, "learning_rate": 1e-3,
             "schedule": {"kind": "polynomial", "end": HEAD_STEPS // 2, "frequency": 10},
             "shrink": True}  # fmt: skip
  start = time.perf_counter()
  out = prune_stage(pipeline, {**PRUNE_OPTIONS, **options})
  seconds = time.perf_counter() - start
  base = models.evaluate(pipeline.model, pipeline.tree, pipeline.dataset)
  ppl = models.evaluate(out.model, out.tree, pipeline.dataset)
  # float32 bytes of the unpruned model, so the ratio column shows what shrinking saved.
  return Record(SUITE, "tiny-lm", f"heads 50% gradual ({HEAD_STEPS} steps) + shrink", "perplexity",
                ppl, base, tree_report(out.tree).total_bytes,
                tree_report(pipeline.tree).float32_bytes, seconds,
                {"shrunk_model": out.model_source})  # fmt: skip


def part_of(record: dict) -> str:
  """Which part of the suite produced a stored row."""
  if record["metric"] == "step_time_ratio":
    return "overhead"
  if record["metric"] == "inference_time_ratio":
    return "heads" if record["model"] == "tiny-lm" else "shrink"
  if record["method"].startswith("heads"):
    return "heads"
  return {"disk_bytes": "bytes", "accuracy": "accuracy", "perplexity": "tiny-lm"}[record["metric"]]


def _parts() -> tuple[str, ...]:
  chosen = tuple(p for p in os.environ.get("JAXSHRINK_SPARSITY_PARTS", "").split(",") if p)
  unknown = sorted(set(chosen) - set(PARTS))
  if unknown:
    raise ValueError(
      f"JAXSHRINK_SPARSITY_PARTS names unknown parts {unknown}; choose from {list(PARTS)}."
    )
  return chosen or PARTS


def run() -> list[Record]:
  parts = _parts()
  stored = Path(__file__).parent / RESULTS / f"{SUITE}.json"
  kept = []
  if parts != PARTS and stored.is_file():
    kept = [r for r in json.loads(stored.read_text())["records"] if part_of(r) not in parts]
  pipeline = _pipeline("digits-cnn")
  runs = {
    "overhead": lambda: [_overhead_row(pipeline)],
    "shrink": lambda: [_shrink_row(pipeline)],
    "heads": lambda: [_heads_row(), _heads_finetuned_row()],
    "bytes": lambda: _bytes_rows(pipeline),
    "accuracy": lambda: _accuracy_rows(
      pipeline, evaluate_tree(pipeline.model, pipeline.tree, pipeline.dataset)
    ),
    "tiny-lm": _tiny_lm_rows,
  }
  fresh = {part: runs[part]() for part in PARTS if part in parts}
  old = {part: [Record(**r) for r in kept if part_of(r) == part] for part in PARTS}
  return [record for part in PARTS for record in fresh.get(part, old[part])]


def _row(records: list[Record], method: str) -> Record | None:
  return next((r for r in records if r.method == method), None)


def summarize(records: list[Record]) -> str:
  """The issue's targets, met or missed, with the measured numbers."""
  lines = []

  def check(label, ok, detail):
    lines.append(f"- {'met' if ok else 'MISSED'}: {label} ({detail})")

  def change(r: Record) -> str:  # an accuracy change on the digits test split, in images too
    images = digits_images(r.value, r.reference_value)
    points = 100 * images / DIGITS_TEST_IMAGES
    return f"{points:+.2f} points, {abs(images)} of {DIGITS_TEST_IMAGES} images"

  gradual = _row(records, "gradual polynomial 90%")
  if gradual:
    loss = 100 * (gradual.reference_value - gradual.value)
    check("gradual 90% loses <= 1.0 point", loss <= 1.0, change(gradual))
  for method, goal in (("90% bitmask", 6.0), ("90% bitmask + int8", 15.0)):
    r = _row(records, method)
    if r:
      ratio = r.float32_bytes / r.size_bytes
      check(f"{method} checkpoint >= {goal:g}x smaller on disk", ratio >= goal, f"{ratio:.2f}x")
  two_four = _row(records, "2:4 + 150 fine-tune steps")
  if two_four:
    loss = 100 * (two_four.reference_value - two_four.value)
    check("2:4 loses <= 0.5 points", loss <= 0.5, change(two_four))
  for label in ("50%", "2:4"):
    ppl = {m: _row(records, f"{m} {label}") for m in ("magnitude", "wanda", "sparsegpt")}
    if all(ppl.values()):
      values = {m: r.value for m, r in ppl.items()}
      ok = values["wanda"] < values["magnitude"] and values["sparsegpt"] < values["magnitude"]
      detail = ", ".join(f"{m} {v:.3f}" for m, v in values.items())
      check(f"tiny-lm {label}: Wanda and SparseGPT beat magnitude", ok, detail)
  overhead = next((r for r in records if r.metric == "step_time_ratio"), None)
  if overhead:
    check("wrapper step <= 1.15x plain", overhead.value <= 1.15, f"{overhead.value:.2f}x")
  for r in records:
    if r.metric == "inference_time_ratio":
      diff = r.extra.get("max_abs_diff_vs_masked", float("nan"))
      check(f"{r.model} {r.method} runs faster than the masked model", r.value < 1.0,
            f"{r.value:.2f}x time, max |diff| {diff:.1e}")  # fmt: skip
  return "\n".join(lines)
