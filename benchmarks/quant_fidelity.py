"""Quantization fidelity: RTN vs GPTQ vs AWQ (weight-only), with Qwix PTQ side by side.

digits-cnn accuracy and tiny-lm perplexity on the full test split, every weight kernel
quantized (embeddings stay float). Calibration: 256 training windows (tiny-lm) / 512 training
images (digits-cnn). Compression wall-clock of RTN, GPTQ and AWQ is measured in the same run
and reported as a ratio against RTN (`seconds_vs_rtn`).
"""

from __future__ import annotations

import math
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxshrink import data, models
from jaxshrink.bench import Record
from jaxshrink.quant import QuantSpec
from jaxshrink.quant.awq import awq
from jaxshrink.quant.gptq import gptq
from jaxshrink.quant.ptq import quantize_params
from jaxshrink.recipes import evaluate_tree
from jaxshrink.report import tree_report
from jaxshrink.tree import Rule

SUITE = "quant_fidelity"
DESCRIPTION = (
  "Weight-only quantization fidelity of every kernel: round-to-nearest (RTN), GPTQ "
  "(act-order) and AWQ at 8/4/3/2 bits, per-channel and group 32, on digits-cnn (accuracy) and "
  "tiny-lm (perplexity, full test split); Qwix 0.1.8 PTQ int8/int4 on the same models. "
  "`seconds_vs_rtn` is compression wall-clock over RTN's in the same run."
)
RULE = Rule(r".*kernel", min_ndim=2)
SPECS = {
  "int8": QuantSpec(bits=8),
  "int4": QuantSpec(bits=4),
  "int4 g32": QuantSpec(bits=4, group_size=32),
  "int3": QuantSpec(bits=3),
  "int3 g32": QuantSpec(bits=3, group_size=32),
  "int2": QuantSpec(bits=2),
}
MODELS = ("digits-cnn", "tiny-lm")
CALIBRATION = {"digits-cnn": (512, 128), "tiny-lm": (256, 32)}  # (examples, batch size)


def _calibration(model, dataset):
  count, batch = CALIBRATION[model.name]
  rng = np.random.default_rng(0)
  x = dataset.x_train[rng.choice(len(dataset.x_train), count, replace=False)]
  return [x[i : i + batch] for i in range(0, count, batch)]


def _compressors(model, batches):
  return {
    "rtn": lambda p, spec: quantize_params(p, RULE, spec),
    "gptq": lambda p, spec: gptq(model.apply, p, batches, RULE, spec, act_order=True),
    "awq": lambda p, spec: awq(model.apply, p, batches, RULE, spec),
  }


def _record(model, method, value, reference, tree, seconds, extra):
  report = tree_report(tree)
  return Record(
    suite=SUITE,
    model=model.name,
    method=method,
    metric=model.metric,
    value=value,
    reference_value=reference,
    size_bytes=report.total_bytes,
    float32_bytes=report.float32_bytes,
    seconds=seconds,
    extra=extra,
  )


def _evaluate(apply, params, dataset, metric, batch_size=256):
  """The zoo metric for an apply whose params the zoo's own shape check cannot build."""
  step = jax.jit(lambda p, x, y: _scores(apply(p, x).astype(jnp.float32), y, metric))
  total, count = 0.0, 0
  for i in range(0, len(dataset.x_test), batch_size):
    y = dataset.y_test[i : i + batch_size]
    total += float(step(params, dataset.x_test[i : i + batch_size], y))
    count += y.size
  return total / count if metric == "accuracy" else math.exp(total / count)


def _scores(logits, y, metric):
  if metric == "accuracy":
    return jnp.sum(jnp.argmax(logits, -1) == y)
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _qwix_eval(model, params, dataset, rules):
  import qwix

  start = time.perf_counter()
  ptq_module = qwix.quantize_model(model.module, qwix.PtqProvider(rules))
  dummy = model.dummy_input(1)
  abstract = jax.eval_shape(ptq_module.init, jax.random.key(0), dummy)["params"]
  qparams = jax.block_until_ready(qwix.quantize_params(params, abstract))
  seconds = time.perf_counter() - start
  value = _evaluate(lambda p, x: ptq_module.apply({"params": p}, x), qparams, dataset, model.metric)
  return value, sum(int(leaf.nbytes) for leaf in jax.tree.leaves(qparams)), seconds


def _qwix_rows(model, params, dataset, reference):
  """Qwix PTQ (per-channel absmax) on the same linen module: weight-only where Qwix allows.

  Qwix's conv requires `act_qtype == weight_qtype`, so when weight-only fails on a model with
  convs, the convs are retried with activations quantized to the same type (noted in `extra`).
  """
  import qwix

  rows = []
  float_bytes = tree_report(params).float32_bytes
  for label, qtype in (("int8", jnp.int8), ("int4", jnp.int4)):
    extra = {"library": "qwix 0.1.8", "bits": 8 if qtype == jnp.int8 else 4}
    attempts = [("weight-only", [qwix.QuantizationRule(module_path=".*", weight_qtype=qtype)])]
    attempts.append((
      f"convs W{extra['bits']}A{extra['bits']}, dense weight-only",
      [qwix.QuantizationRule(module_path=".*", op_names=("conv_general_dilated",),
                             weight_qtype=qtype, act_qtype=qtype),
       qwix.QuantizationRule(module_path=".*", weight_qtype=qtype)],
    ))  # fmt: skip
    attempts.append((
      "convs float, dense weight-only",
      [qwix.QuantizationRule(module_path=".*", op_names=("dot_general",), weight_qtype=qtype)],
    ))  # fmt: skip
    record = None
    for mode, rules in attempts:
      try:
        value, nbytes, seconds = _qwix_eval(model, params, dataset, rules)
      except Exception as e:  # noqa: BLE001  (a peer's failure is a result, recorded as such)
        extra[f"error ({mode})"] = f"{type(e).__name__}: {e}"[:400]
        continue
      extra["mode"] = mode
      extra["in_memory_bytes"] = nbytes
      record = Record(SUITE, model.name, f"qwix ptq {label}", model.metric, value, reference,
                      nbytes, float_bytes, seconds, extra)  # fmt: skip
      break
    if record is None:
      record = Record(SUITE, model.name, f"qwix ptq {label}", model.metric, None, reference,
                      None, float_bytes, None, extra)  # fmt: skip
    rows.append(record)
  return rows


def run() -> list[Record]:
  records = []
  for name in MODELS:
    model = models.get_model(name)
    dataset = data.get_dataset(model.data)
    params = models.pretrained(model, progress=False)
    batches = _calibration(model, dataset)
    reference = evaluate_tree(model, params, dataset)
    records.append(_record(model, "float32", reference, reference, params, None, {}))
    compressors = _compressors(model, batches)
    for label, spec in SPECS.items():
      times = {}
      for method, compress in compressors.items():
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")  # group fallbacks on small convs are expected
          start = time.perf_counter()
          tree = jax.block_until_ready(compress(params, spec))
          times[method] = time.perf_counter() - start
        value = evaluate_tree(model, tree, dataset)
        extra = {"bits": spec.bits, "group_size": spec.group_size, "spec": spec.describe(),
                 "seconds_vs_rtn": round(times[method] / times["rtn"], 2)}  # fmt: skip
        if method == "gptq":
          extra["act_order"] = True
        records.append(
          _record(model, f"{method} {label}", value, reference, tree, times[method], extra)
        )
    records.extend(_qwix_rows(model, params, dataset, reference))
  return records
