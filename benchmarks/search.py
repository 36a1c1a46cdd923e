"""search: per-kernel search against uniform recipes, on MiniLM and tiny-lm, in one run.

Uniform rows quantize every kernel the same way (GPTQ for int4/int3, RTN for int8; MiniLM's
gathered tables int8 per row in every quantized row). Searched rows run the `search` stage
with its defaults: candidates float, bf16, int8, int4-g128, int4-g32, int3-g128 and int3-g32
for every kernel and every gathered table (GPTQ below 8 bits for kernels):

- "searched, <= int4 GPTQ g128 bytes": `max_bytes` set to the bytes the uniform int4 GPTQ g128
  row stored, `max_drop: null`: the least-error assignment no larger.
- "searched, max_drop X": the smallest assignment whose drop on the validation rows (training
  rows calibration never reads) is within X: 0.005 of mean cosine for MiniLM, 2% of
  perplexity for tiny-lm.

Every value is measured on the test split, which the search never sees (MiniLM: mean cosine
to the float embeddings on 200 held-out sentences; tiny-lm: perplexity on the stdlib-text test
windows). The first search of each model runs with an empty sensitivity cache, so its
`search_seconds` is the whole cost; the second reuses the cached sensitivities.
"""

from __future__ import annotations

import time
from typing import Any

from jaxshrink.bench import Record

SUITE = "search"
DESCRIPTION = (
  "Per-kernel search (`search` stage) against uniform int8/int4/int3 recipes: bytes against the "
  "held-out metric, with the searched points on the same Pareto plot."
)
GPTQ = {"method": "gptq", "symmetric": False}
UNIFORM = (
  ("int8 RTN", {"weight_bits": 8, "method": "rtn"}),
  ("int4 GPTQ g128", {"weight_bits": 4, "group_size": 128, **GPTQ}),
  ("int4 GPTQ g32", {"weight_bits": 4, "group_size": 32, **GPTQ}),
  ("int3 GPTQ g32", {"weight_bits": 3, "group_size": 32, **GPTQ}),
)
# Uniform MiniLM rows store the gathered tables int8 per row (`embeddings`); the searches
# choose each table's storage with the kernels.
MODELS: dict[str, dict[str, Any]] = {
  "minilm-l6": {"data": "minilm-sentences", "embeddings": {"bits": 8}, "max_drop": 0.005},
  "tiny-lm": {"data": None, "embeddings": None, "max_drop": 0.02},
}
EQUAL_BYTES = "searched, <= int4 GPTQ g128 bytes"


def _clear_search_cache() -> None:
  from jaxshrink.data.cache import cache_dir

  for path in (cache_dir() / "search").glob("*.json"):
    path.unlink()


def _run(model: str, stages: list, label: str) -> Record:
  from jaxshrink.recipes import parse_recipe, run_recipe

  setting = MODELS[model]
  raw = {"model": model, "stages": stages, "export": {"serving": None}}
  if setting["data"]:
    raw["data"] = setting["data"]
  start = time.perf_counter()
  out = run_recipe(parse_recipe(raw), progress=False)
  seconds = time.perf_counter() - start
  extra: dict[str, Any] = {}
  for entry in out.metrics["stages"]:
    if entry["stage"] == "search":
      found = entry["search"]
      extra = {
        "validation_drop": round(found["validation"]["drop"], 5),
        "verifications": len(found["iterations"]),
        "sensitivity_seconds": found["sensitivity"]["seconds"],
        "sensitivity_cached": found["sensitivity"]["cached"],
        "search_seconds": round(entry["seconds"], 1),
        "choices": _count(found["layers"]),
      }
  return Record(
    suite=SUITE, model=model, method=label, metric=out.metrics["metric"],
    value=out.metrics["value"], reference_value=out.metrics["reference_value"],
    size_bytes=out.report.total_bytes, float32_bytes=out.report.float32_bytes,
    seconds=round(seconds, 1), extra=extra,
  )  # fmt: skip


def _count(layers: list[dict]) -> dict[str, int]:
  counts: dict[str, int] = {}
  for layer in layers:
    counts[layer["candidate"]] = counts.get(layer["candidate"], 0) + 1
  return dict(sorted(counts.items()))


def run() -> list[Record]:
  records = []
  for model, setting in MODELS.items():
    records.append(_run(model, [], "float32"))
    for label, options in UNIFORM:
      stage = {"target": ".*kernel", **options}
      if setting["embeddings"]:
        stage["embeddings"] = setting["embeddings"]
      records.append(_run(model, [{"quantize": stage}], label))
    cap = next(r.size_bytes for r in records if r.model == model and r.method == "int4 GPTQ g128")
    _clear_search_cache()  # the first search pays for its sensitivities
    records.append(_run(model, [{"search": {"max_bytes": cap, "max_drop": None}}], EQUAL_BYTES))
    records.append(
      _run(model, [{"search": {"max_drop": setting["max_drop"]}}],
           f"searched, max_drop {setting['max_drop']}")
    )  # fmt: skip
  return records


def _drop(r: Record) -> float:
  change = r.value - r.reference_value if r.metric == "perplexity" else r.reference_value - r.value
  return change / abs(r.reference_value)


def summarize(records: list[Record]) -> str:
  lines = []
  for model, setting in MODELS.items():
    rows = {r.method: r for r in records if r.model == model}
    equal, budget = rows.get(EQUAL_BYTES), rows.get(f"searched, max_drop {setting['max_drop']}")
    uniform = rows.get("int4 GPTQ g128")
    if not (equal and budget and uniform):
      continue
    lower = equal.metric == "perplexity"
    gain = (uniform.value - equal.value) if lower else (equal.value - uniform.value)
    target = 0.005 if not lower else 0.0
    met = equal.size_bytes <= uniform.size_bytes and gain >= target
    lines.append(
      f"- {model}, equal bytes: searched {equal.value:.4f} at {equal.size_bytes / 1e6:.2f} MB "
      f"against uniform int4 GPTQ g128 {uniform.value:.4f} at {uniform.size_bytes / 1e6:.2f} MB "
      f"({'+' if gain >= 0 else ''}{gain:.4f} better; target {'>= 0.005' if not lower else '> 0'}"
      f": {'met' if met else 'missed'})."
    )
    within = [r for m, r in rows.items() if m in dict(UNIFORM) and _drop(r) <= setting["max_drop"]]
    smaller = all(budget.size_bytes < r.size_bytes for r in within)
    lines.append(
      f"- {model}, max_drop {setting['max_drop']}: searched drops {_drop(budget):.4f} on the test "
      f"split ({budget.extra['validation_drop']:.4f} on the validation rows it was verified on) "
      f"at {budget.size_bytes / 1e6:.2f} MB; uniform recipes within the same drop: "
      + (", ".join(f"{r.method} {r.size_bytes / 1e6:.2f} MB" for r in within) or "none")
      + f" ({'smaller than all' if smaller else 'not smaller than all'})."
    )
    cold = equal.extra.get("search_seconds")
    lines.append(
      f"- {model} search cost: {cold:.0f} s with an empty cache (sensitivities "
      f"{equal.extra['sensitivity_seconds']:.0f} s), {budget.extra['search_seconds']:.0f} s "
      f"reusing them ({budget.extra['verifications']} verifications)."
    )
  return "\n".join(lines)


def plot(records: list[Record], ax: Any) -> None:
  """Relative metric loss against stored size (fraction of float32), both models."""
  colors = {"minilm-l6": "tab:blue", "tiny-lm": "tab:orange"}
  for model, color in colors.items():
    rows = [r for r in records if r.model == model and r.method != "float32"]
    uniform = sorted((r for r in rows if not r.method.startswith("searched")),
                     key=lambda r: r.size_bytes)  # fmt: skip
    ax.plot([r.size_bytes / r.float32_bytes for r in uniform], [100 * _drop(r) for r in uniform],
            "o-", color=color, label=f"{model} uniform")  # fmt: skip
    searched = [r for r in rows if r.method.startswith("searched")]
    ax.plot([r.size_bytes / r.float32_bytes for r in searched],
            [100 * _drop(r) for r in searched], "*", markersize=14, color=color,
            label=f"{model} searched")  # fmt: skip
  ax.set_xlabel("stored bytes / float32 bytes")
  ax.set_ylabel("metric loss vs float (%, held-out)")
  ax.set_yscale("symlog", linthresh=0.1)
  ax.legend()
