"""Float baselines of every zoo model, and half-precision storage beside them.

Each model's float32 row is the reference the other suites' rows compare to.
Evaluation time is the best of three runs, measured interleaved with the
bf16 variant, and reported as a ratio against float32.
"""

from __future__ import annotations

import time

from jaxshrink import cast_params, data, evaluation, models
from jaxshrink.bench import Record
from jaxshrink.report import tree_report

SUITE = "baseline"
DESCRIPTION = (
  "Float32 baselines of the zoo models (trained on first use, then cached) and bfloat16 "
  "storage of the same params. `eval_time_ratio` is bf16 over float32 test-set evaluation "
  "time, best of 3, interleaved."
)
MODELS = ("digits-mlp", "digits-mlp-nnx", "digits-cnn", "digits-cnn-nnx", "tiny-lm")


def _best_of(fn, repeats: int = 3) -> tuple[float, float]:
  value, best = None, float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    value = fn()
    best = min(best, time.perf_counter() - start)
  return value, best


def run() -> list[Record]:
  records = []
  for name in MODELS:
    model = models.get_model(name)
    dataset = data.get_dataset(model.data)
    start = time.perf_counter()
    params = models.pretrained(model)
    load_seconds = time.perf_counter() - start
    variants = {"float32": params, "bf16 storage": cast_params(params, dtype="bfloat16")}
    timings = {}
    values = {}
    for _ in range(2):  # interleave so drift on a shared machine hits both alike
      for method, tree in variants.items():
        values[method], t = _best_of(
          lambda tree=tree, m=model, d=dataset: evaluation.evaluate_tree(m, tree, d)
        )
        timings[method] = min(timings.get(method, float("inf")), t)
    for method, tree in variants.items():
      report = tree_report(tree)
      extra = {"params": report.num_params, "eval_time_ratio": timings[method] / timings["float32"]}
      if method == "float32":
        extra["load_or_train_seconds"] = load_seconds
      records.append(
        Record(
          suite=SUITE,
          model=name,
          method=method,
          metric=model.metric,
          value=values[method],
          reference_value=values["float32"],
          size_bytes=report.total_bytes,
          float32_bytes=report.float32_bytes,
          seconds=timings[method],
          extra=extra,
        )
      )
  return records
