"""profile: where all-MiniLM-L6-v2's forward time goes, in float32 and in W8A8 on the integer path.

Each component of the forward is jitted alone and timed on the exact shapes it has inside the
model (one encoder layer's weights stand for all six: the shapes are the same), then
multiplied by how many times one forward runs it. The whole jitted forward is timed in the
same interleaved rounds; each component's share is `ms x count / whole` within a round (the
median over rounds is reported), and the coverage `sum / whole` says how far the isolated
parts add up to the fused whole (XLA fuses elementwise ops into their neighbours inside the
model, so the parts can sum to more than it).

Components: the embedding lookup (word + position + token-type rows, summed), the weight
matmuls (`nnx.Linear`: q/k/v and the attention output 384x384, the intermediate 384x1536, the
FFN output 1536x384, bias included), the attention matmuls (Q.K^T with its 1/sqrt(d) scale,
and P.V), the masked softmax, the erf GELU, LayerNorm, and the rest (residual adds, mean
pooling with L2 normalization). The W8A8 model is the `minilm-w8a8` recipe's: int8
per-channel kernels with dynamic per-token int8 activations, int8 x int8 -> int32 matmuls
(`quantized_apply`), int8 embedding tables per row; there the weight matmul is the int8 dot
and its rescale, and the activation quantization (per-token absmax, round, clip, cast) is a
component of its own, run once per kernel.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.bench import Record

SUITE = "profile"
DESCRIPTION = (
  "all-MiniLM-L6-v2's forward split into components (embedding lookup, weight matmuls, "
  "activation quantization, attention matmuls, softmax, GELU, LayerNorm, rest), float32 and "
  "W8A8 on the integer path, at 64x32 and 32x128 tokens: each component jitted alone on its "
  "in-model shapes x its count per forward; value = its share of the whole jitted forward "
  "timed in the same round, median of 11 interleaved rounds (whole-forward rows: coverage = "
  "sum of parts / whole; ms = best round)."
)
SHAPES = ((64, 32), (32, 128))
VARIANTS = ("float32", "W8A8")
CATEGORIES = (
  "embedding lookup",
  "weight matmuls",
  "activation quantization",
  "attention matmuls",
  "softmax",
  "GELU",
  "LayerNorm",
  "rest",
)
ROUNDS = 11
# Each timed measurement repeats a part until it spans about this long, near a whole forward's
# time, so that load from other jobs hits parts and whole alike.
MEASURE_SECONDS = 0.2
WHOLE = "whole forward (jitted)"


class Component(NamedTuple):
  """One part of the forward, runnable alone.

  Attributes:
    name: what it is, e.g. `q/k/v/attention-output matmul`.
    category: one of `CATEGORIES`.
    count: how many times one forward runs it.
    run: no-argument callable running the jitted part on its inputs.
    operands: the shapes it runs on, for the notes.
  """

  name: str
  category: str
  count: int
  run: Callable[[], Any]
  operands: str


def _bind(fn: Callable, *args) -> Callable[[], Any]:
  jitted = jax.jit(fn)
  return lambda: jitted(*args)


def _normal(key: int, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def float_components(config, params: dict, ids: jax.Array) -> list[Component]:
  """The float32 model's parts at the batch `ids` (B, L)."""
  from flax import nnx

  from jaxshrink.models.bert import PRECISION, mean_pool_normalize

  b, length = ids.shape
  hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_layers
  heads, head_dim = config.num_heads, config.head_size
  emb = params["embeddings"]
  layer = params["encoder"]["layer_0"]
  x, h = _normal(1, (b, length, hidden)), _normal(2, (b, length, inter))
  q, k = _normal(3, (b, length, heads, head_dim)), _normal(4, (b, length, heads, head_dim))
  scores = _normal(5, (b, heads, length, length))
  probs = jax.nn.softmax(scores, axis=-1)
  mask = ids != config.pad_id

  def embed(word, position, token_type, ids):
    out = jnp.take(word, ids, axis=0)
    out = out + jnp.take(position, jnp.arange(ids.shape[1]), axis=0)[None]
    return out + jnp.take(token_type, jnp.zeros((1, ids.shape[1]), jnp.int32), axis=0)

  def linear(x, kernel, bias):
    return jnp.dot(x, kernel, precision=PRECISION) + bias

  def qk(q, k):
    return jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=PRECISION) / math.sqrt(head_dim)

  def masked_softmax(scores, mask):
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    return jax.nn.softmax(scores, axis=-1)

  def pv(probs, v):
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=PRECISION)
    return context.reshape(b, length, heads * head_dim)

  # The model's LayerNorm (jaxshrink.models.bert): two-pass variance.
  norm = nnx.LayerNorm(
    hidden, epsilon=config.layer_norm_eps, use_fast_variance=False, rngs=nnx.Rngs(0)
  )
  norm_graph, norm_state = nnx.split(norm)
  attention = layer["attention"]
  btok = f"({b}, {length}"
  return [
    Component("embedding lookup (3 tables)", "embedding lookup", 1,
              _bind(embed, emb["word_embeddings"]["embedding"],
                    emb["position_embeddings"]["embedding"],
                    emb["token_type_embeddings"]["embedding"], ids),
              f"ids {tuple(ids.shape)}"),
    Component("q/k/v/attention-output matmul", "weight matmuls", 4 * layers,
              _bind(linear, x, attention["query"]["kernel"], attention["query"]["bias"]),
              f"{btok}, {hidden}) @ ({hidden}, {hidden})"),
    Component("intermediate matmul", "weight matmuls", layers,
              _bind(linear, x, layer["intermediate"]["kernel"], layer["intermediate"]["bias"]),
              f"{btok}, {hidden}) @ ({hidden}, {inter})"),
    Component("FFN output matmul", "weight matmuls", layers,
              _bind(linear, h, layer["output"]["kernel"], layer["output"]["bias"]),
              f"{btok}, {inter}) @ ({inter}, {hidden})"),
    Component("Q.K^T", "attention matmuls", layers, _bind(qk, q, k),
              f"{btok}, {heads}, {head_dim}) x2"),
    Component("P.V", "attention matmuls", layers, _bind(pv, probs, k),
              f"({b}, {heads}, {length}, {length}) @ {btok}, {heads}, {head_dim})"),
    Component("softmax (masked)", "softmax", layers, _bind(masked_softmax, scores, mask),
              f"({b}, {heads}, {length}, {length})"),
    Component("GELU (erf)", "GELU", layers, _bind(lambda h: jax.nn.gelu(h, approximate=False), h),
              f"{btok}, {inter})"),
    Component("LayerNorm", "LayerNorm", 1 + 2 * layers,
              _bind(lambda s, x: nnx.merge(norm_graph, s)(x), norm_state, x),
              f"{btok}, {hidden})"),
    Component("residual add", "rest", 2 * layers, _bind(jnp.add, x, x), f"{btok}, {hidden})"),
    Component("mean pooling + L2 normalize", "rest", 1, _bind(mean_pool_normalize, x, mask),
              f"{btok}, {hidden})"),
  ]  # fmt: skip


def w8a8_components(config, ctree: dict, ids: jax.Array) -> list[Component]:
  """The W8A8 model's parts: its int8 matmuls, activation quantization and int8 tables; the
  float parts (attention, softmax, GELU, LayerNorm, rest) are the float32 model's."""
  from jaxshrink.quant.serve import _act_codes, gather_rows, integer_matmul

  b, length = ids.shape
  hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_layers
  rows = b * length
  emb = ctree["embeddings"]
  layer = ctree["encoder"]["layer_0"]
  query, intermediate, output = (
    layer["attention"]["query"], layer["intermediate"], layer["output"]
  )  # fmt: skip

  def embed(word, position, token_type, ids):
    out = gather_rows(word, ids) + gather_rows(position, jnp.arange(ids.shape[1]))[None]
    return out + gather_rows(token_type, jnp.zeros((1, ids.shape[1]), jnp.int32))

  def quantize_activations(x, q):
    # The integer path's own per-token quantizer (`quantized_apply` -> `qarray_matmul`).
    codes, scale = _act_codes(x.reshape(-1, x.shape[-1]).astype(jnp.float32), q, (1,))
    return codes.astype(jnp.int8), scale

  def int8_linear(codes, scale, q, bias):
    y = integer_matmul(codes, q) * scale
    return y.reshape(b, length, q.n) + bias

  def codes_for(q, key):
    return jax.jit(quantize_activations)(_normal(key, (b, length, q.k)), q)

  btok = f"({b}, {length}"
  parts = []
  for name, q, bias, count, key in (
    ("q/k/v/attention-output int8 matmul", query["kernel"], query["bias"], 4 * layers, 11),
    ("intermediate int8 matmul", intermediate["kernel"], intermediate["bias"], layers, 12),
    ("FFN output int8 matmul", output["kernel"], output["bias"], layers, 13),
  ):
    codes, scale = codes_for(q, key)
    parts.append(Component(name, "weight matmuls", count,
                           _bind(int8_linear, codes, scale, q, bias),
                           f"int8 ({rows}, {q.k}) @ int8 ({q.k}, {q.n}) -> int32"))  # fmt: skip
  parts += [
    Component("activation quantization (384 wide)", "activation quantization", 5 * layers,
              _bind(quantize_activations, _normal(14, (b, length, hidden)), query["kernel"]),
              f"{btok}, {hidden}) per token"),
    Component("activation quantization (1536 wide)", "activation quantization", layers,
              _bind(quantize_activations, _normal(15, (b, length, inter)), output["kernel"]),
              f"{btok}, {inter}) per token"),
    Component("embedding lookup (3 int8 tables)", "embedding lookup", 1,
              _bind(embed, emb["word_embeddings"]["embedding"],
                    emb["position_embeddings"]["embedding"],
                    emb["token_type_embeddings"]["embedding"], ids),
              f"ids {tuple(ids.shape)}, int8 per-row"),
  ]  # fmt: skip
  return parts


def _batch(dataset, batch: int, length: int) -> jax.Array:
  """`batch` rows of `length` tokens: training sentences (32 tokens each) side by side."""
  per_row = length // dataset.x_train.shape[1]
  ids = dataset.x_train[: batch * per_row].reshape(batch, per_row * dataset.x_train.shape[1])
  return jnp.asarray(ids[:, :length])


def _w8a8_tree(model, params, ids) -> dict:
  """The `minilm-w8a8` recipe's tree: int8 kernels (dynamic per-token activations), int8
  embedding tables per row."""
  from jaxshrink.quant import QuantSpec, ptq
  from jaxshrink.quant.ptq import gather_tables, quantize_tables

  ctree = ptq(model.apply, params, [ids], ".*kernel", QuantSpec(bits=8), activation_bits=8,
              static_activations=False)  # fmt: skip
  tables = [p for p, use in gather_tables(model.apply, params, ids).items() if use.rows]
  return quantize_tables(ctree, tables, QuantSpec(bits=8))


def _dispatch_ms() -> float:
  """Per-call cost of a trivial jitted function: the floor under every isolated timing."""
  tiny = jax.jit(lambda x: x + 1)
  x = jnp.ones(())
  jax.block_until_ready(tiny(x))
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    for _ in range(200):
      out = tiny(x)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / 200)
  return 1e3 * best


def time_parts(fns: dict[Any, Callable[[], Any]], rounds: int = ROUNDS) -> dict[Any, np.ndarray]:
  """Per-call ms of each `fn` in each of `rounds` round-robin rounds, `(rounds,)` per name.

  Each measurement repeats a fast call until it spans about `MEASURE_SECONDS`. Shares are
  taken within a round (part against the whole timed seconds apart), then the median over
  rounds: load from other jobs drifts over a run, and hits both sides of a same-round ratio.
  """
  inner = {}
  for name, fn in fns.items():
    jax.block_until_ready(fn())
    start = time.perf_counter()
    jax.block_until_ready(fn())
    inner[name] = max(1, round(MEASURE_SECONDS / max(time.perf_counter() - start, 1e-6)))
  ms = {name: np.zeros(rounds) for name in fns}
  for i in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(inner[name]):
        out = fn()
      jax.block_until_ready(out)
      ms[name][i] = 1e3 * (time.perf_counter() - start) / inner[name]
  return ms


def run() -> list[Record]:
  from jaxshrink import models
  from jaxshrink.data import get_dataset
  from jaxshrink.models.minilm import MINILM_CONFIG
  from jaxshrink.quant import quantized_apply

  model = models.get_model("minilm-l6")
  params = models.pretrained(model, progress=False)
  dataset = get_dataset(model.data)
  ctree = _w8a8_tree(model, params, _batch(dataset, *SHAPES[0]))
  whole = {"float32": jax.jit(model.apply), "W8A8": jax.jit(quantized_apply(model.apply))}
  trees = {"float32": params, "W8A8": ctree}
  dispatch = _dispatch_ms()
  records = []
  for batch, length in SHAPES:
    ids = _batch(dataset, batch, length)
    floats = float_components(MINILM_CONFIG, params, ids)
    ints = w8a8_components(MINILM_CONFIG, ctree, ids)
    # The W8A8 forward runs the float model's attention, softmax, GELU, LayerNorm and rest.
    # (timed once, under the float32 key).
    shared = [c for c in floats if c.category not in ("weight matmuls", "embedding lookup")]
    parts = {
      "float32": [(c, ("float32", c.name)) for c in floats],
      "W8A8": [(c, ("W8A8", c.name)) for c in ints] + [(c, ("float32", c.name)) for c in shared],
    }
    fns = {}
    for variant in VARIANTS:
      fns[(variant, WHOLE)] = lambda v=variant, ids=ids: whole[v](trees[v], ids)
      for c, key in parts[variant]:
        fns.setdefault(key, c.run)
    ms = time_parts(fns)
    shape = f"minilm-l6 {batch}x{length}"
    for variant in VARIANTS:
      whole_ms = ms[(variant, WHOLE)]
      summed = sum(ms[key] * c.count for c, key in parts[variant])
      records.append(Record(
        SUITE, shape, f"{variant}: {WHOLE}", "coverage",
        round(float(np.median(summed / whole_ms)), 4), None, None, None,
        round(float(whole_ms.min()) / 1e3, 4),
        {"ms": round(float(whole_ms.min()), 3), "sum_of_parts_ms": round(float(summed.min()), 3),
         "ratio_vs_float32": round(float(np.median(whole_ms / ms[("float32", WHOLE)])), 3),
         "rounds": ROUNDS, "dispatch_ms": round(dispatch, 4)},
      ))  # fmt: skip
      for c, key in parts[variant]:
        each = ms[key]
        records.append(Record(
          SUITE, shape, f"{variant}: {c.name}", "fraction_of_forward",
          round(float(np.median(each * c.count / whole_ms)), 4), None, None, None, None,
          {"category": c.category, "ms": round(float(each.min()), 4), "count": c.count,
           "ms_per_forward": round(float(each.min()) * c.count, 3), "operands": c.operands},
        ))  # fmt: skip
  return records


def _split(records) -> dict[tuple[str, str], dict[str, Any]]:
  """`{(shape, variant): {"whole": record, "categories": {category: share of whole}}}`."""
  out: dict[tuple[str, str], dict[str, Any]] = {}
  for r in records:
    variant, _, part = r.method.partition(": ")
    entry = out.setdefault((r.model, variant), {"whole": None, "categories": {}})
    if part == WHOLE:
      entry["whole"] = r
    else:
      cats = entry["categories"]
      cats[r.extra["category"]] = cats.get(r.extra["category"], 0.0) + r.value
  return out


def summarize(records) -> str:
  """The split by category per shape, and what it bounds: Amdahl on the weight matmuls."""
  split = _split(records)
  shapes = list(dict.fromkeys(model for model, _ in split))
  lines = [
    "Share of the whole jitted forward (each part timed alone x its count; coverage = sum of "
    "parts / whole):",
    "",
    "| category | "
    + " | ".join(f"{s.removeprefix('minilm-l6 ')} {v}" for s in shapes for v in VARIANTS)
    + " |",  # fmt: skip
    "|---|" + "---|" * (len(shapes) * len(VARIANTS)),
  ]
  keys = [(s, v) for s in shapes for v in VARIANTS if (s, v) in split]
  for category in CATEGORIES:
    cells = [split[k]["categories"].get(category) for k in keys]
    if all(c is None for c in cells):
      continue
    lines.append(f"| {category} | " + " | ".join(
      "–" if c is None else f"{100 * c:.1f}%" for c in cells) + " |")  # fmt: skip
  lines.append("| **coverage** | " + " | ".join(f"{split[k]['whole'].value:.2f}" for k in keys)
               + " |")  # fmt: skip
  lines.append("")
  for shape in shapes:
    f32, w8 = split.get((shape, "float32")), split.get((shape, "W8A8"))
    if f32 is None or w8 is None:
      continue
    f_mm = f32["categories"]["weight matmuls"]
    w_mm = w8["categories"]["weight matmuls"] + w8["categories"].get("activation quantization", 0)
    # Amdahl on shares of the sum of parts (they add to 1); W8A8 shares are of its own whole,
    # which is `ratio_vs_float32` times the float32 whole.
    measured = w8["whole"].extra["ratio_vs_float32"]
    x = f_mm / f32["whole"].value
    r = w_mm * measured / f_mm
    lines.append(
      f"- {shape.removeprefix('minilm-l6 ')}: weight matmuls are {100 * x:.0f}% of the float32 "
      f"forward's parts, so an int8 matmul at ratio r to float32 puts the W8A8 forward at "
      f"{1 - x:.2f} + {x:.2f} r of the float32 time (Amdahl): {1 - x / 2:.2f}x at r = 0.5, "
      f"and {1 - x:.2f}x even if the matmuls were free. Here the int8 matmuls with their "
      f"activation quantization take r = {r:.2f}, which predicts {1 - x + x * r:.2f}x; the "
      f"whole W8A8 forward measured {measured:.2f}x."
    )
  dispatch = next((r.extra.get("dispatch_ms") for r in records if r.method.endswith(WHOLE)), None)
  if dispatch is not None:
    lines += ["", f"An empty jitted call costs {dispatch:.3f} ms here; every part's time "
              "includes one, the fused whole pays it once."]  # fmt: skip
  return "\n".join(lines)


def plot(records, ax) -> None:
  """One stacked bar per (shape, variant): each category's share of the whole forward."""
  split = _split(records)
  keys = list(split)
  colors = dict(zip(CATEGORIES, ("tab:gray", "tab:blue", "tab:cyan", "tab:orange", "tab:red",
                                 "tab:green", "tab:purple", "tab:brown"), strict=True))  # fmt: skip
  left = np.zeros(len(keys))
  for category in CATEGORIES:
    widths = np.array([split[k]["categories"].get(category, 0.0) for k in keys])
    if widths.any():
      ax.barh(range(len(keys)), widths, left=left, color=colors[category], label=category)
      left += widths
  ax.axvline(1.0, color="black", lw=0.8, ls="--")
  ax.set_yticks(range(len(keys)))
  ax.set_yticklabels([f"{s.removeprefix('minilm-l6 ')} {v}" for s, v in keys])
  ax.invert_yaxis()
  ax.set_xlabel("share of the whole jitted forward (sum of parts; dashed: the whole)")
  ax.set_title("all-MiniLM-L6-v2: where the forward time goes")
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4)
