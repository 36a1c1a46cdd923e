"""Low-rank factorization of digits-cnn's big Dense layer vs magnitude pruning, at equal
parameter counts, and the compute drop of running the factors as two matmuls.

`dense1/kernel` (1024x128) holds 131k of the model's 150k params. At each budget the
truncated SVD gets rank r with r (1024 + 128) <= budget; magnitude pruning keeps the same
number of weights (one-shot |w| top-k, the sparsity package's criterion, counted as
nonzeros without index overhead). Fine-tuned rows train for the same steps. The whitened rows
fit the factors to dense1's outputs on 512 training images (the `factorize` stage's default,
`method: whitened`, with its 4 batches of 128).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink import data, models
from jaxshrink.bench import Record, best_time
from jaxshrink.capture import collect, gram_reducer
from jaxshrink.encoding import materialize
from jaxshrink.lowrank import factorize, finetune, lowrank_apply, plan_ranks
from jaxshrink.recipes import evaluate_tree
from jaxshrink.report import tree_report

SUITE = "lowrank"
DESCRIPTION = (
  "digits-cnn dense1 (1024x128, 87% of the params) at 50/3/1% of its params: SVD low-rank "
  "without and with fine-tuning (300 steps) vs magnitude pruning (with the same fine-tuning) "
  "at the same param count; and time of the factored model/layer as two matmuls vs dense "
  "(`time_ratio`, interleaved, best of 5)."
)
TARGET = "dense1/kernel"
BUDGETS = (0.5, 0.03, 0.01)
FINETUNE_STEPS = 300


def _magnitude_mask(w: jax.Array, keep: int) -> jax.Array:
  threshold = jnp.sort(jnp.abs(w).ravel())[-keep]
  return jnp.abs(w) >= threshold


def _interleaved(fns: dict, rounds: int = 2) -> dict:
  for fn in fns.values():
    jax.block_until_ready(fn())  # compile
  best = dict.fromkeys(fns, float("inf"))
  for _ in range(rounds):
    for name, fn in fns.items():
      best[name] = min(best[name], best_time(fn))
  return best


def _timing_records(model, params, dataset) -> list[Record]:
  records = []
  x = jnp.asarray(np.resize(dataset.x_test, (1024, 8, 8, 1)))
  ctree = factorize(params, TARGET, budget=0.25)
  dense_fn = jax.jit(lambda t, x: model.apply(materialize(t), x))
  fast_fn = jax.jit(lowrank_apply(model.apply))
  t = _interleaved({"dense": lambda: dense_fn(params, x), "factored": lambda: fast_fn(ctree, x)})
  flops = {
    "dense": dense_fn.lower(params, x).compile().cost_analysis()["flops"],
    "factored": fast_fn.lower(ctree, x).compile().cost_analysis()["flops"],
  }
  records.append(Record(
    suite=SUITE, model="digits-cnn", method="forward: dense1 rank "
    f"{ctree['dense1']['kernel'].rank} two matmuls vs dense", metric="seconds",
    value=t["factored"], reference_value=t["dense"], size_bytes=None, float32_bytes=None,
    seconds=t["factored"], extra={"time_ratio": t["factored"] / t["dense"], "batch": 1024,
                                  "flops_ratio": flops["factored"] / flops["dense"]},
  ))  # fmt: skip
  # One big Dense layer alone, where the matmul is all the work.
  w = jax.random.normal(jax.random.key(0), (2048, 2048)) / 45.0
  layer = {"w": {"kernel": w}}
  xl = jax.random.normal(jax.random.key(1), (1024, 2048))
  dense_l = jax.jit(lambda p, x: x @ materialize(p)["w"]["kernel"])
  fast_l = jax.jit(lowrank_apply(lambda p, x: x @ p["w"]["kernel"]))
  for rank in (256, 64):
    lr = factorize(layer, "w/kernel", rank=rank)
    t = _interleaved(
      {"dense": lambda: dense_l(layer, xl), "factored": lambda lr=lr: fast_l(lr, xl)}
    )
    records.append(Record(
      suite=SUITE, model="dense 2048x2048", method=f"rank {rank} two matmuls vs dense",
      metric="seconds", value=t["factored"], reference_value=t["dense"],
      size_bytes=tree_report(lr).total_bytes, float32_bytes=tree_report(layer).total_bytes,
      seconds=t["factored"], extra={"time_ratio": t["factored"] / t["dense"], "batch": 1024,
                                    "flops_ratio": 2 * rank * 4096 / (2048 * 2048)},
    ))  # fmt: skip
  return records


def run() -> list[Record]:
  model = models.get_model("digits-cnn")
  dataset = data.get_dataset("digits")
  params = models.pretrained(model)
  reference = evaluate_tree(model, params, dataset)
  total_params = tree_report(params).num_params
  dense_params = 1024 * 128
  x = np.asarray(dataset.x_train)
  batches = [x[i * 128 : (i + 1) * 128] for i in range(4)]
  collected = collect(model.apply, params, batches, TARGET, {"gram": gram_reducer()})
  grams = {TARGET: collected.stats[TARGET]["gram"][0]}
  records = []
  for budget in BUDGETS:
    rank = plan_ranks(params, TARGET, budget=budget)[TARGET]
    kept = rank * (1024 + 128)
    model_params = total_params - dense_params + kept
    common = {"budget": budget, "rank": rank, "dense1_params": kept,
              "model_params": model_params}  # fmt: skip
    ctree = factorize(params, TARGET, budget=budget)
    whitened = factorize(params, TARGET, budget=budget, grams=grams)
    start = time.perf_counter()
    tuned = finetune(model.apply, ctree, dataset, steps=FINETUNE_STEPS, key=jax.random.key(0),
                     augment=model.augment)  # fmt: skip
    tune_s = time.perf_counter() - start
    mask = _magnitude_mask(params["dense1"]["kernel"], kept)

    def masked_apply(p, x, mask=mask):
      return model.apply(
        {**p, "dense1": {**p["dense1"], "kernel": p["dense1"]["kernel"] * mask}}, x
      )

    pruned = finetune(masked_apply, params, dataset, steps=FINETUNE_STEPS, key=jax.random.key(0),
                      augment=model.augment)  # fmt: skip
    rows = [
      ("low-rank, no fine-tuning", evaluate_tree(model, ctree, dataset), ctree, None),
      ("whitened low-rank, no fine-tuning", evaluate_tree(model, whitened, dataset), whitened,
       None),
      ("low-rank + fine-tuning", evaluate_tree(model, tuned, dataset), tuned, tune_s),
      ("magnitude pruning + fine-tuning",
       float(models.evaluate(model, jax.tree.map(lambda a: a, {**pruned, "dense1": {
         **pruned["dense1"], "kernel": pruned["dense1"]["kernel"] * mask}}), dataset)),
       None, None),
    ]  # fmt: skip
    for method, value, tree, seconds in rows:
      report = tree_report(tree) if tree is not None else None
      records.append(Record(
        suite=SUITE, model="digits-cnn", method=f"{method} @ {budget:.0%} dense1",
        metric="accuracy", value=value, reference_value=reference,
        size_bytes=report.total_bytes if report else model_params * 4,
        float32_bytes=total_params * 4, seconds=seconds,
        extra={**common, "delta_points": 100 * (value - reference)},
      ))  # fmt: skip
  return records + _timing_records(model, params, dataset)
