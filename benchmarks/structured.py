"""structured: Minitron-style width pruning of MiniLM, then `recover`, smaller and faster.

One run of `examples/recipes/minilm-structured-recover.yaml`: the `structured` stage ranks
layers and feed-forward channels on transfer-corpus sentences (the recipe drops one layer and
keeps every head) and shrinks MiniLM to two thirds of its non-embedding params; the metric
(mean cosine to the float embeddings on the 200 held-out sentences of `minilm-sentences`) is
measured right after it (`before`) and after `recover`. Three more rows measure the cut
one-shot with one width in every layer (`widths: uniform`): without the least-squares refit
of the output projections (`refit: false`, which also ranks by activations), refitted but
ranked by activations (`ranking: activation`), and ranked by the refit's error as the recipe
does.
The checkpoint is saved and `jaxshrink eval` rebuilds it from the recorded model source
(`extra.eval_value`). Inference time: the jitted float and shrunk encoders on the held-out
sentences, best of rounds timed interleaved (`jaxshrink.bench.interleaved_best`) in the same
run, reported as a ratio (`extra.time_ratio`, shrunk over float).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxshrink.bench import Record

SUITE = "structured"
DESCRIPTION = (
  "Minitron-style structured pruning of MiniLM (one layer and feed-forward channels; a third "
  "of the non-embedding params removed) then `recover`: mean cosine before and after, inference "
  "time against float."
)
RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
RECIPE = RECIPES / "minilm-structured-recover.yaml"
PRUNED = "structured 67% params"
SLICED = "structured 67% params, refit: false"
BY_ACTIVATION = "structured 67% params, ranking: activation"
UNIFORM = "structured 67% params, widths: uniform"
RECOVERED = "structured 67% params + recover"
# The targets: cosine after recover, and shrunk time over float time.
TARGET_COSINE = 0.97
TARGET_TIME_RATIO = 0.75


def _speed(float_model, float_params, model, params, ids) -> dict[str, float]:
  import jax
  import jax.numpy as jnp

  from jaxshrink.bench import interleaved_best

  x = jnp.asarray(ids)
  fns = {}
  for name, m, p in (("float", float_model, float_params), ("shrunk", model, params)):
    apply = jax.jit(m.apply)
    jax.block_until_ready(apply(p, x))  # compiled before timing
    fns[name] = functools.partial(apply, p, x)
  best = interleaved_best(fns, rounds=7, calls=3)
  return {
    "float_ms": round(best["float"] * 1e3, 2),
    "shrunk_ms": round(best["shrunk"] * 1e3, 2),
    "time_ratio": round(best["shrunk"] / best["float"], 4),
  }


def _eval_checkpoint(pipeline, recipe) -> float:
  """Saves the recovered tree and returns `jaxshrink eval`'s value for it (a fresh process)."""
  from jaxshrink import export

  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "ckpt"
    export.save(out, pipeline.tree, model=pipeline.model_source, data=recipe.data,
                recipe={**recipe.raw, "params": recipe.params}, metrics={})  # fmt: skip
    code = "import sys; from jaxshrink.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "eval", str(out), "--json"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return float(json.loads(done.stdout)["value"])


def run() -> list[Record]:
  import numpy as np

  from jaxshrink.recipes import evaluate_metrics, load_recipe, prepare, run_stages
  from jaxshrink.report import tree_report
  from jaxshrink.sparsity.minitron import bert_config, encoder_param_count

  recipe = load_recipe(RECIPE)
  if os.environ.get("JAXSHRINK_STRUCTURED_STEPS"):  # a quick smoke run of the whole suite
    steps = int(os.environ["JAXSHRINK_STRUCTURED_STEPS"])
    stages = (recipe.stages[0], ("recover", {**recipe.stages[1][1], "steps": steps}))
    recipe = dataclasses.replace(recipe, stages=stages)
  pipeline = prepare(recipe, progress=False)
  reference = evaluate_metrics(pipeline.float_model, pipeline.float_params, pipeline.dataset)
  kind, options = recipe.stages[0]

  def one_shot(**changed) -> float:
    """The metric right after the structured stage with these options changed."""
    stage = ((kind, {**options, "widths": "uniform", **changed}),)
    out = run_stages(dataclasses.replace(recipe, stages=stage), pipeline)
    return evaluate_metrics(out.model, out.tree, out.dataset)["value"]

  sliced_value = one_shot(refit=False)
  activation_value = one_shot(ranking="activation")
  uniform_value = one_shot()
  start = time.perf_counter()
  pipeline = run_stages(dataclasses.replace(recipe, stages=recipe.stages[:1]), pipeline)
  prune_seconds = time.perf_counter() - start
  found = pipeline.log[-1]["structured"]
  before = evaluate_metrics(pipeline.model, pipeline.tree, pipeline.dataset)
  start = time.perf_counter()
  pipeline = run_stages(dataclasses.replace(recipe, stages=recipe.stages[1:]), pipeline)
  recover_seconds = time.perf_counter() - start
  after = evaluate_metrics(pipeline.model, pipeline.tree, pipeline.dataset)
  speed = _speed(pipeline.float_model, pipeline.float_params, pipeline.model, pipeline.tree,
                 np.asarray(pipeline.dataset.x_test))  # fmt: skip
  eval_value = _eval_checkpoint(pipeline, recipe)
  float_params = encoder_param_count(bert_config(pipeline.float_model))
  kept_params = encoder_param_count(bert_config(pipeline.model))
  report = tree_report(pipeline.tree)
  float_report = tree_report(pipeline.float_params)
  common = {
    "model_source": pipeline.model_source,
    "encoder_params": kept_params,
    "float_encoder_params": float_params,
    "kept_fraction": round(kept_params / float_params, 4),
    "removed_fraction": round(1 - kept_params / float_params, 4),
    "kept_layers": found["kept_layers"],
    "layer_heads": found["layer_heads"],
    "layer_intermediate": found["layer_intermediate"],
    "layer_importance": found["layer_importance"],
    **speed,
  }
  metric = pipeline.model.metric
  return [
    Record(suite=SUITE, model="minilm-l6", method=PRUNED, metric=metric, value=before["value"],
           reference_value=reference["value"], size_bytes=report.total_bytes,
           float32_bytes=float_report.float32_bytes, seconds=round(prune_seconds, 1),
           extra={**common, **{k: round(v, 4) for k, v in before.items() if k != "value"}}),
    Record(suite=SUITE, model="minilm-l6", method=SLICED, metric=metric, value=sliced_value,
           reference_value=reference["value"], size_bytes=report.total_bytes,
           float32_bytes=float_report.float32_bytes, seconds=None,
           extra={"refit": False, "kept_fraction": common["kept_fraction"]}),
    Record(suite=SUITE, model="minilm-l6", method=BY_ACTIVATION, metric=metric,
           value=activation_value, reference_value=reference["value"],
           size_bytes=report.total_bytes, float32_bytes=float_report.float32_bytes, seconds=None,
           extra={"ranking": "activation", "kept_fraction": common["kept_fraction"]}),
    Record(suite=SUITE, model="minilm-l6", method=UNIFORM, metric=metric, value=uniform_value,
           reference_value=reference["value"], size_bytes=report.total_bytes,
           float32_bytes=float_report.float32_bytes, seconds=None,
           extra={"widths": "uniform", "kept_fraction": common["kept_fraction"]}),
    Record(suite=SUITE, model="minilm-l6", method=RECOVERED, metric=metric, value=after["value"],
           reference_value=reference["value"], size_bytes=report.total_bytes,
           float32_bytes=float_report.float32_bytes, seconds=round(recover_seconds, 1),
           extra={**common, "before": before["value"], "eval_value": eval_value,
                  "recover_minutes": round(recover_seconds / 60, 2),
                  "recover_steps": recipe.stages[1][1].get("steps"),
                  "recovered": pipeline.log[-1].get("recovered", {}).get("data"),
                  **{k: round(v, 4) for k, v in after.items() if k != "value"}}),
  ]  # fmt: skip


def summarize(records: list[Record]) -> str:
  """Targets met or missed: cosine after recover, and shrunk time over float time."""
  lines = []
  for r in records:
    if r.method != RECOVERED:
      continue
    e = r.extra
    cosine = "met" if r.value >= TARGET_COSINE else "missed"
    speed = "met" if e["time_ratio"] <= TARGET_TIME_RATIO else "missed"
    lines.append(
      f"- {r.method}: {e['removed_fraction']:.1%} of the non-embedding params removed; mean "
      f"cosine {e['before']:.4f} before recover (refit projections), {r.value:.4f} after (target "
      f">= {TARGET_COSINE}: {cosine}; `jaxshrink eval` of the saved checkpoint: "
      f"{e['eval_value']:.4f}); inference {e['time_ratio']:.2f}x float time (target <= "
      f"{TARGET_TIME_RATIO}: {speed}); recover {e['recover_minutes']:.1f} CPU minutes."
    )
  return "\n".join(lines)
