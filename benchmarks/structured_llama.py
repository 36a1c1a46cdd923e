"""structured_llama: Minitron-style width pruning of llama-tiny, then `recover`, smaller and faster.

One run of `examples/recipes/llama-tiny-structured-recover.yaml`: the `structured` stage ranks
query heads (within their key/value groups), MLP channels and layers on training windows and
shrinks llama-tiny to two thirds of its decoder-layer params; held-out perplexity is measured
without the least-squares refit (`refit: false`), with it, and after `recover`. The recovered
checkpoint is saved and `jaxshrink eval` rebuilds it from the recorded model source
(`extra.eval_value`). Speed, float against shrunk, timed interleaved in the same run (best of
rounds, `jaxshrink.bench.interleaved_best`): the jitted forward over 16 test windows
(`forward_time_ratio`) and `generate` of 32 tokens after a 16-token prompt at batch 1
(`decode_time_ratio`), each shrunk over float.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxshrink.bench import Record

SUITE = "structured_llama"
DESCRIPTION = (
  "Minitron-style structured pruning of llama-tiny (query heads within their GQA groups, MLP "
  "channels; a third of the decoder-layer params removed), refit and `recover`: held-out "
  "perplexity at each step, forward and decode time against float."
)
RECIPE = Path(__file__).resolve().parents[1] / "examples" / "recipes"
RECIPE = RECIPE / "llama-tiny-structured-recover.yaml"
SLICED = "structured 67% params, refit: false"
PRUNED = "structured 67% params"
RECOVERED = "structured 67% params + recover"
WINDOWS, PROMPT, NEW_TOKENS = 16, 16, 32


def _speed(float_model, float_params, model, params, windows) -> dict[str, float]:
  import jax
  import jax.numpy as jnp

  from jaxshrink.bench import interleaved_best
  from jaxshrink.generate import generate

  x = jnp.asarray(windows)
  prompt = x[:1, :PROMPT]
  forward, decode = {}, {}
  for name, m, p in (("float", float_model, float_params), ("shrunk", model, params)):
    apply = jax.jit(m.apply)
    jax.block_until_ready(apply(p, x))  # compiled before timing
    forward[name] = functools.partial(apply, p, x)
    run = functools.partial(generate, m, p, prompt, NEW_TOKENS)
    jax.block_until_ready(run().tokens)
    decode[name] = lambda run=run: run().tokens
  fwd = interleaved_best(forward, rounds=7, calls=3)
  dec = interleaved_best(decode, rounds=5)
  return {
    "float_forward_ms": round(fwd["float"] * 1e3, 2),
    "shrunk_forward_ms": round(fwd["shrunk"] * 1e3, 2),
    "forward_time_ratio": round(fwd["shrunk"] / fwd["float"], 4),
    "float_tokens_per_s": round(NEW_TOKENS / dec["float"], 1),
    "shrunk_tokens_per_s": round(NEW_TOKENS / dec["shrunk"], 1),
    "decode_time_ratio": round(dec["shrunk"] / dec["float"], 4),
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

  recipe = load_recipe(RECIPE)
  pipeline = prepare(recipe, progress=False)
  reference = evaluate_metrics(pipeline.float_model, pipeline.float_params, pipeline.dataset)
  kind, options = recipe.stages[0]
  sliced = run_stages(dataclasses.replace(recipe, stages=((kind, {**options, "refit": False}),)),
                      pipeline)  # fmt: skip
  sliced_value = evaluate_metrics(sliced.model, sliced.tree, sliced.dataset)["value"]
  start = time.perf_counter()
  pipeline = run_stages(dataclasses.replace(recipe, stages=recipe.stages[:1]), pipeline)
  prune_seconds = time.perf_counter() - start
  found = pipeline.log[-1]["structured"]
  before = evaluate_metrics(pipeline.model, pipeline.tree, pipeline.dataset)["value"]
  start = time.perf_counter()
  pipeline = run_stages(dataclasses.replace(recipe, stages=recipe.stages[1:]), pipeline)
  recover_seconds = time.perf_counter() - start
  after = evaluate_metrics(pipeline.model, pipeline.tree, pipeline.dataset)["value"]
  windows = np.asarray(pipeline.dataset.x_test)[:WINDOWS]
  speed = _speed(pipeline.float_model, pipeline.float_params, pipeline.model, pipeline.tree,
                 windows)  # fmt: skip
  size, float_size = tree_report(pipeline.tree), tree_report(pipeline.float_params)
  before_params, after_params = found["decoder_params"]
  common = {
    "model_source": pipeline.model_source,
    "decoder_params": after_params,
    "float_decoder_params": before_params,
    "removed_fraction": round(1 - after_params / before_params, 4),
    **{k: found[k] for k in ("num_heads", "num_kv_heads", "intermediate_size")},
  }
  rows = ((SLICED, sliced_value, None, {"refit": False}),
          (PRUNED, before, prune_seconds, common),
          (RECOVERED, after, recover_seconds,
           {**common, **speed, "before": before, "eval_value": _eval_checkpoint(pipeline, recipe),
            "recover_minutes": round(recover_seconds / 60, 2),
            "recover_steps": recipe.stages[1][1].get("steps"),
            "change_vs_float": after / reference["value"] - 1}))  # fmt: skip
  return [
    Record(suite=SUITE, model="llama-tiny", method=method, metric=pipeline.model.metric,
           value=value, reference_value=reference["value"], size_bytes=size.total_bytes,
           float32_bytes=float_size.float32_bytes,
           seconds=None if seconds is None else round(seconds, 1), extra=extra)
    for method, value, seconds, extra in rows
  ]  # fmt: skip


def summarize(records: list[Record]) -> str:
  lines = []
  for r in records:
    if r.method != RECOVERED:
      continue
    e = r.extra
    lines.append(
      f"- {r.method}: {e['removed_fraction']:.1%} of the decoder-layer params removed "
      f"({e['num_heads']} query heads over {e['num_kv_heads']} key/value heads, MLP "
      f"{e['intermediate_size']}); perplexity {e['before']:.2f} after the refit, {r.value:.2f} "
      f"after recover against float {r.reference_value:.2f} ({e['change_vs_float']:+.1%}; "
      f"`jaxshrink eval` of the saved checkpoint: {e['eval_value']:.2f}); forward "
      f"{e['forward_time_ratio']:.2f}x and decode {e['decode_time_ratio']:.2f}x float time; "
      f"recover {e['recover_minutes']:.1f} CPU minutes."
    )
  return "\n".join(lines)
