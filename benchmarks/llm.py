"""llm: llama-tiny compressed, perplexity on held-out corpus-bpe windows and greedy agreement.

Each weight method is the shortest recipe of its technique on the decoder's projections and
head (`.*(proj|lm_head)/kernel`; the embedding table is gathered, not multiplied), run with
`run_recipe` and scored on the test windows, which calibration never reads. The KV-cache rows
keep float weights and store keys and values quantized (int8 or int4, one scale per token and
head): their perplexity runs every test window through the KV-cache decode path, so each
logit is computed from the quantized cache. Greedy agreement: 16 prompts (the first 16 tokens
of 16 test windows) continued for 64 tokens by the compressed model and by float; the share
of positions where the two chose the same token (after one difference the two continuations
part, so every later position can differ). Next-token agreement: on those 16 whole windows,
teacher-forced, the share of positions where both rank the same token first.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink import models
from jaxshrink.bench import Record
from jaxshrink.data import get_dataset
from jaxshrink.generate import generate
from jaxshrink.recipes import parse_recipe, run_recipe
from jaxshrink.serving import serve

SUITE = "llm"
DESCRIPTION = (
  "llama-tiny (10M-param Llama decoder, trained here): held-out perplexity of int8 and int4 "
  "weight-only (RTN, GPTQ), 2:4 SparseGPT, W8A8 and int8/int4 KV caches, and greedy agreement "
  "with float over 16 prompts x 64 tokens."
)
MODEL = "llama-tiny"
KERNELS = ".*(proj|lm_head)/kernel"
PROMPTS, PROMPT_LEN, NEW_TOKENS = 16, 16, 64
INT4 = {"weight_bits": 4, "group_size": 128, "symmetric": False}
METHODS = (
  ("int8 weight-only", {"quantize": {"weight_bits": 8}}),
  ("int4 g128 RTN", {"quantize": {**INT4}}),
  ("int4 g128 GPTQ", {"quantize": {**INT4, "method": "gptq"}}),
  ("int4 g128 AWQ", {"quantize": {**INT4, "method": "awq"}}),
  ("2:4 SparseGPT", {"prune": {"method": "sparsegpt", "structure": "2:4"}}),
  ("W8A8", {"quantize": {"weight_bits": 8, "activation_bits": 8}}),
)


def _agreement(model, params, tree, prompts, **options) -> float:
  want = np.asarray(generate(model, params, prompts, NEW_TOKENS).tokens)
  got = np.asarray(generate(model, tree, prompts, NEW_TOKENS, **options).tokens)
  return float(np.mean(want == got))


def _next_token_agreement(apply, params, tree_apply, tree, windows) -> float:
  """Teacher-forced: the share of positions of `windows` where both pick the same next token
  (each position sees the true prefix, so one early difference does not carry over)."""
  want = jnp.argmax(jax.jit(apply)(params, windows), -1)
  got = jnp.argmax(jax.jit(tree_apply)(tree, windows), -1)
  return float(jnp.mean(want == got))


def _kv_apply(model, bits: int):
  """`apply(params, windows) -> logits` with every window prefilled through a quantized cache."""
  from jaxshrink.models.llama import decode_functions

  decode, init_cache = decode_functions(model.module)

  def apply(p, x):
    return decode(p, x, init_cache(x.shape[0], x.shape[1], jnp.float32, bits), 0)[0]

  return apply


def _kv_perplexity(model, params, dataset, bits: int) -> float:
  apply = _kv_apply(model, bits)
  return float(models.evaluate(dataclasses.replace(model, apply=apply), params, dataset))


def _kv_bytes_per_token(model, bits: int | None) -> int:
  from jaxshrink.models.llama import init_cache

  config = model.module.args[0]
  cache = init_cache(config, 1, 1, jnp.bfloat16, bits)
  return int(sum(a.nbytes for a in jax.tree.leaves(cache)))


def run() -> list[Record]:
  model = models.get_model(MODEL)
  params = models.pretrained(model, progress=False)
  dataset = get_dataset(model.data)
  prompts = jnp.asarray(np.asarray(dataset.x_test)[:PROMPTS, :PROMPT_LEN])
  windows = jnp.asarray(np.asarray(dataset.x_test)[:PROMPTS])
  float32_bytes = int(sum(a.nbytes for a in jax.tree.leaves(params)))
  records = []
  for label, stage in METHODS:
    kind, options = next(iter(stage.items()))
    raw = {"model": MODEL, "stages": [{kind: {"target": KERNELS, **options}}],
           "export": {"serving": None}}  # fmt: skip
    start = time.perf_counter()
    out = run_recipe(parse_recipe(raw), progress=False)
    seconds = time.perf_counter() - start
    serving = "integer" if kind == "quantize" else None
    agreement = _agreement(model, params, out.pipeline.tree, prompts, serving=serving)
    served = serve(model.apply, out.pipeline.tree, serving or "decode-once")
    next_token = _next_token_agreement(model.apply, params, served.apply, served.params, windows)
    records.append(Record(
      suite=SUITE, model=MODEL, method=label, metric="perplexity", value=out.metrics["value"],
      reference_value=out.metrics["reference_value"], size_bytes=out.report.total_bytes,
      float32_bytes=out.report.float32_bytes, seconds=round(seconds, 1),
      extra={"greedy_agreement": agreement, "next_token_agreement": next_token,
             "change_vs_float": out.metrics["value"] / out.metrics["reference_value"] - 1},
    ))  # fmt: skip
  reference = float(models.evaluate(model, params, dataset))
  bf16_cache = _kv_bytes_per_token(model, None)
  for bits in (8, 4):
    start = time.perf_counter()
    value = _kv_perplexity(model, params, dataset, bits)
    kv_apply = _kv_apply(model, bits)
    cache_bytes = _kv_bytes_per_token(model, bits)
    records.append(Record(
      suite=SUITE, model=MODEL, method=f"int{bits} KV cache", metric="perplexity", value=value,
      reference_value=reference, size_bytes=float32_bytes, float32_bytes=float32_bytes,
      seconds=round(time.perf_counter() - start, 1),
      extra={"greedy_agreement": _agreement(model, params, params, prompts, kv_bits=bits),
             "next_token_agreement": _next_token_agreement(
               model.apply, params, kv_apply, params, windows),
             "change_vs_float": value / reference - 1,
             "cache_bytes_per_token": cache_bytes,
             "bf16_cache_bytes_per_token": bf16_cache,
             "cache_vs_bf16": cache_bytes / bf16_cache},
    ))  # fmt: skip
  return records


def summarize(records: list[Record]) -> str:
  lines = []
  for r in records:
    e = r.extra
    text = (f"- {r.method}: perplexity {r.value:.2f} against float {r.reference_value:.2f} "
            f"({100 * e['change_vs_float']:+.2f}%), next-token agreement "
            f"{100 * e['next_token_agreement']:.2f}%, greedy agreement "
            f"{100 * e['greedy_agreement']:.1f}%")  # fmt: skip
    if "cache_vs_bf16" in e:
      text += (f"; {e['cache_bytes_per_token']} cache bytes per token, "
               f"{e['cache_vs_bf16']:.2f}x a bf16 cache")  # fmt: skip
    lines.append(text + ".")
  return "\n".join(lines)
