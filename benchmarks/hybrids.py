"""hybrids: stages chained on digits-cnn, each row against the float model in the same run.

Every row is a recipe with the stages named in its method, run through `run_recipe` (the
same path as `jaxshrink compress`) and evaluated on the 360 held-out test images; calibration
and training use the training split only. `seconds` is the whole recipe's wall time on this
machine's CPU; `extra.lost_images` is the accuracy change in test images (positive: lost).
"""

from __future__ import annotations

import time

from jaxshrink.bench import DIGITS_TEST_IMAGES, Record

SUITE = "hybrids"
DESCRIPTION = (
  "Pruning, quantization and low rank chained in one recipe on digits-cnn (calibrated methods "
  "calibrate on the compressed model): accuracy and bytes against float."
)
INT4 = {"weight_bits": 4, "group_size": 32}
ROWS = (
  ("50% SparseGPT -> GPTQ int4 g32", [
    {"prune": {"method": "sparsegpt", "sparsity": 0.5}},
    {"quantize": {"method": "gptq", **INT4}},
  ]),
  ("50% SparseGPT + int4 g32 (joint)", [
    {"prune": {"method": "sparsegpt", "sparsity": 0.5, **INT4}},
  ]),
  ("2:4 SparseGPT -> GPTQ int4 g32", [
    {"prune": {"method": "sparsegpt", "structure": "2:4"}},
    {"quantize": {"method": "gptq", **INT4}},
  ]),
  ("2:4 SparseGPT + int4 g32 (joint)", [
    {"prune": {"method": "sparsegpt", "structure": "2:4", **INT4}},
  ]),
  ("50% Wanda -> AWQ int4 g32", [
    {"prune": {"method": "wanda", "sparsity": 0.5}},
    {"quantize": {"method": "awq", **INT4}},
  ]),
  ("50% oneshot -> W8A8", [
    {"prune": {"method": "oneshot", "sparsity": 0.5}},
    {"quantize": {"activation_bits": 8}},
  ]),
  ("50% oneshot -> QAT int4 g32", [
    {"prune": {"method": "oneshot", "sparsity": 0.5}},
    {"quantize": {"method": "qat", **INT4}},
  ]),
  ("low rank budget 0.5 -> GPTQ int4 g32 (factors)", [
    {"factorize": {"budget": 0.5}},
    {"quantize": {"method": "gptq", **INT4}},
  ]),
  ("low rank budget 0.5 -> RTN int4 g32 (factors)", [
    {"factorize": {"budget": 0.5}},
    {"quantize": INT4},
  ]),
  ("gradual 90% (shortest recipe)", [
    {"prune": {"sparsity": 0.9, "method": "gradual"}},
  ]),
)  # fmt: skip


def _row(method: str, stages: list) -> Record:
  from jaxshrink.recipes import parse_recipe, run_recipe

  start = time.perf_counter()
  recipe = parse_recipe({"model": "digits-cnn", "stages": stages, "export": {"serving": None}})
  result = run_recipe(recipe, progress=False)
  seconds = time.perf_counter() - start
  metrics, report = result.metrics, result.report
  lost = round((metrics["reference_value"] - metrics["value"]) * DIGITS_TEST_IMAGES)
  return Record(
    suite=SUITE,
    model="digits-cnn",
    method=method,
    metric="accuracy",
    value=metrics["value"],
    reference_value=metrics["reference_value"],
    size_bytes=report.total_bytes,
    float32_bytes=report.float32_bytes,
    seconds=round(seconds, 1),
    extra={"lost_images": lost, "stages": stages, "ratio": round(report.ratio, 2)},
  )


def run() -> list[Record]:
  return [_row(method, stages) for method, stages in ROWS]


def summarize(records: list[Record]) -> str:
  lines = []
  for r in records:
    lost = r.extra["lost_images"]
    verdict = f"loses {lost} of {DIGITS_TEST_IMAGES} test images" if lost > 0 else (
      f"gains {-lost} test images" if lost < 0 else "same accuracy as float"
    )  # fmt: skip
    lines.append(f"- {r.method}: {r.value:.4f} ({verdict}), {r.extra['ratio']}x smaller.")
  return "\n".join(lines)
