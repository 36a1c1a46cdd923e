"""Sparsity suite: accuracy vs sparsity, 2:4, tiny-lm one-shot pruning, wrapper overhead,
shrink speed and bytes on disk."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax

import jaxshrink.sparsity.stage  # noqa: F401
from jaxshrink import data, models
from jaxshrink.bench import Record, best_time
from jaxshrink.export import disk_bytes, save
from jaxshrink.models import cross_entropy_loss
from jaxshrink.recipes import Pipeline, evaluate_tree
from jaxshrink.report import tree_report
from jaxshrink.sparsity import (
  NM,
  Pruner,
  encode_sparse,
  oneshot_prune,
  polynomial_schedule,
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
  "(every checkpoint file) for 90%, 2:4 and 2:4 + int4."
)
SPARSITIES = (0.5, 0.75, 0.9, 0.95)
STEPS = 400
CNN_RULE = {"target": ".*kernel", "exclude": "conv1/kernel"}


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
  pruned90, _ = oneshot_prune(pipeline.tree, Pruner(rule, 0.9, allocation="global"))
  pruned24, masks24 = oneshot_prune(pipeline.tree, Pruner(rule, structure="2:4"))
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
             "sparsity": 0.75, "method": "oneshot"}  # fmt: skip
  masked, _ = _stage(pipeline, **options, encode=False)
  masks = Pruner("(conv1|conv2|dense1)/kernel", 0.75, structure="channel").masks(pipeline.tree)
  small_model, small = shrink_model(pipeline.model, masked.tree, masks)
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
      pruned, _ = fn()
      seconds = time.perf_counter() - start
      ppl = models.evaluate(model, pruned, ds)
      label = "50%" if structure == "unstructured" else "2:4"
      rows.append(_record("tiny-lm", f"{method} {label}", "perplexity", ppl, base, pruned,
                          seconds))  # fmt: skip
  return rows


def run() -> list[Record]:
  pipeline = _pipeline("digits-cnn")
  base = evaluate_tree(pipeline.model, pipeline.tree, pipeline.dataset)
  records = [_overhead_row(pipeline), _shrink_row(pipeline)]
  records += _bytes_rows(pipeline)
  records += _accuracy_rows(pipeline, base)
  records += _tiny_lm_rows()  # last: the tiny-lm weights train on first use
  return records
