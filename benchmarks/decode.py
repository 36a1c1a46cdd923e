"""decode: tokens per second of `jaxshrink.generate` on `llama-300m`, at batch 1 and batch 8.

Rows, all timed interleaved in one run (best of `ROUNDS`), each generating `NEW_TOKENS` tokens
after a `PROMPT`-token prompt (the short prefill is included in the time): float32, bf16
weights, int8 weight-only (per channel), int4 g128 weight-only, W8A8 (dynamic per-token
activations, the int8 path) and an int8 KV cache over float32 weights. The compressed trees run
in the `integer` serving mode: a weight-only kernel meeting a few rows streams its codes
(`jaxshrink.quant.streamed`), W8A8 kernels multiply int8 x int8.

Batch-1 decoding reads every weight once per token, so its ceiling is the memory bandwidth
over the bytes of weights read per token (the embedding table is only indexed, not read).
The bandwidth is measured in the same run (the best of a few reductions over a 512 MB array),
and each row reports its achieved fraction of that ceiling. Peak memory is what XLA reports
for the compiled generation program: its arguments (weights, prompt), outputs and temporaries
(the KV cache among them).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from jaxshrink import models
from jaxshrink.bench import Record, interleaved_best
from jaxshrink.generate import generate
from jaxshrink.quant.ptq import quantize_params
from jaxshrink.quant.spec import LayerQuant, QuantSpec
from jaxshrink.tree import flatten

SUITE = "decode"
DESCRIPTION = (
  "Generation speed of llama-300m (random weights) at batch 1 and 8: tokens/s of float32, "
  "bf16, int8 and int4-g128 weight-only, W8A8 and an int8 KV cache, interleaved in one run; "
  "batch-1 rows also as a fraction of the memory-bandwidth ceiling, and the program's peak "
  "memory."
)
MODEL = "llama-300m"
PROMPT = 8
NEW_TOKENS = 24
ROUNDS = 3
KERNELS = ".*(proj|lm_head)/kernel"


def _bandwidth() -> float:
  """Bytes per second of a streaming read on this device (best of 5 sums of 512 MB)."""
  big = jnp.ones((128 * 1024 * 1024,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(big).block_until_ready()
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    total(big).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return big.nbytes / best


def _nbytes(tree) -> int:
  return int(sum(a.nbytes for a in jax.tree.leaves(tree)))


def _bytes_per_token(tree) -> int:
  """Bytes of weights one decode step reads: all but the embedding table (rows are gathered)."""
  skip = sum(_nbytes(leaf) for path, leaf in flatten(tree).items() if "embed_tokens" in path)
  return _nbytes(tree) - skip


def _variants(params) -> dict[str, tuple]:
  """`label -> (tree, generate kwargs)`."""
  bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, params)
  int8 = quantize_params(params, KERNELS, QuantSpec(bits=8))
  int4 = quantize_params(params, KERNELS, QuantSpec(bits=4, group_size=128))
  w8a8 = quantize_params(params, KERNELS, LayerQuant(QuantSpec(bits=8), activation_bits=8))
  return {
    "float32": (params, {}),
    "bf16": (bf16, {}),
    "int8 weight-only": (int8, {"serving": "integer"}),
    "int4 g128 weight-only": (int4, {"serving": "integer"}),
    "W8A8": (w8a8, {"serving": "integer"}),
    "int8 KV cache": (params, {"kv_bits": 8}),
  }


def _peak_bytes(model, tree, prompt, options) -> int | None:
  """Arguments + outputs + temporaries of the compiled generation program, as XLA plans them."""
  from jaxshrink import generate as gen

  try:
    lowered = gen.lower(model, tree, prompt, NEW_TOKENS, **options)
    stats = lowered.compile().memory_analysis()
  except (AttributeError, NotImplementedError):
    return None
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes)  # fmt: skip


def run() -> list[Record]:
  model = models.get_model(MODEL)
  params = models.pretrained(model, progress=False)
  variants = _variants(params)
  bandwidth = _bandwidth()
  records = []
  for batch in (1, 8):
    prompt = jax.random.randint(jax.random.key(batch), (batch, PROMPT), 1, 1000, jnp.int32)
    fns = {
      label: (lambda tree=tree, options=options, prompt=prompt: generate(
        model, tree, prompt, NEW_TOKENS, **options).tokens)
      for label, (tree, options) in variants.items()
    }  # fmt: skip
    for fn in fns.values():
      jax.block_until_ready(fn())  # compiled before timing
    seconds = interleaved_best(fns, rounds=ROUNDS)
    base = seconds["float32"]
    for label, (tree, options) in variants.items():
      tokens_per_s = batch * NEW_TOKENS / seconds[label]
      per_token = _bytes_per_token(tree)
      extra = {
        "batch": batch,
        "tokens_per_s": tokens_per_s,
        "speedup_vs_float32": base / seconds[label],
        "weight_bytes_per_token": per_token,
        "peak_bytes": _peak_bytes(model, tree, prompt, options),
        "bandwidth_gb_s": bandwidth / 1e9,
      }
      if batch == 1:
        ceiling = bandwidth / per_token
        extra["ceiling_tokens_per_s"] = ceiling
        extra["fraction_of_ceiling"] = tokens_per_s / ceiling
      records.append(Record(
        suite=SUITE, model=MODEL, method=f"{label}, batch {batch}", metric="tokens_per_s",
        value=tokens_per_s, reference_value=batch * NEW_TOKENS / base,
        size_bytes=_nbytes(tree), float32_bytes=_nbytes(params), seconds=seconds[label],
        extra=extra,
      ))  # fmt: skip
  return records


def summarize(records: list[Record]) -> str:
  lines = []
  for r in records:
    e = r.extra
    text = (f"- {r.method}: {e['tokens_per_s']:.1f} tokens/s, {e['speedup_vs_float32']:.2f}x "
            "float32")  # fmt: skip
    if "fraction_of_ceiling" in e:
      text += f", {100 * e['fraction_of_ceiling']:.0f}% of the bandwidth ceiling"
    if e.get("peak_bytes"):
      text += f"; peak memory {e['peak_bytes'] / 2**20:.0f} MB"
    lines.append(text + ".")
  return "\n".join(lines)
