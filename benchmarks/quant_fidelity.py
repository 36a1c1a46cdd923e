"""Quantization fidelity: RTN vs GPTQ vs AWQ, W8A8 (± SmoothQuant), QAT, and Qwix side by side.

Every weight kernel is quantized (embeddings stay float). Calibration is collected once per
model and reused for every bit width (GPTQ Hessians, AWQ statistics). The compression
wall-clock of full `quantize_params` / `ptq` / `gptq` / `awq` calls (calibration included) on
tiny-lm is reported in separate rows.
"""

from __future__ import annotations

import math
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxshrink import capture, data, models
from jaxshrink.bench import Record
from jaxshrink.data.dataset import Dataset
from jaxshrink.encoding import materialize
from jaxshrink.hessian import collect_hessians
from jaxshrink.quant import QuantSpec
from jaxshrink.quant.awq import abs_mean_reducer, awq, awq_matrix
from jaxshrink.quant.gptq import gptq, gptq_kernel
from jaxshrink.quant.ptq import ptq, quantize_params
from jaxshrink.quant.qarray import QArray, normalize_contract_dims
from jaxshrink.quant.qat import qat_finetune
from jaxshrink.recipes import evaluate_tree
from jaxshrink.report import tree_report
from jaxshrink.tree import Rule, flatten, map_selected

SUITE = "quant_fidelity"
DESCRIPTION = (
  "Fidelity with every kernel quantized (embeddings float): digits-cnn accuracy (full 360-image "
  "test split) and tiny-lm perplexity (512 test windows drawn with seed 0). Weight-only RTN, "
  "GPTQ (act-order) and AWQ at 8/4/3 bits per-channel and int4 g32, from one cached "
  "calibration set per model (512 training images / 256 training windows); W8A8 PTQ (static "
  "absmax activation scales, integer path) with and without SmoothQuant (alpha 0.5); QAT at "
  "4 and 2 bits (200 Adam steps from the float weights, then convert); Qwix 0.1.8 PTQ int8 "
  "and int4 on the same linen module. `compress` rows: tiny-lm wall-clock of one full call "
  "(calibration included), `seconds_vs_rtn` over round-to-nearest's in the same run."
)
RULE = Rule(r".*kernel", min_ndim=2)
SPECS = {
  "int8": QuantSpec(bits=8),
  "int4": QuantSpec(bits=4),
  "int4 g32": QuantSpec(bits=4, group_size=32),
  "int3": QuantSpec(bits=3),
}
MODELS = ("digits-cnn", "tiny-lm")
CALIBRATION = {"digits-cnn": (512, 128), "tiny-lm": (256, 32)}  # (examples, batch size)
TEST_SUBSET = {"tiny-lm": 512}  # test windows evaluated (digits-cnn: the whole split)
QAT_STEPS = 200


def _calibration(model, dataset):
  count, batch = CALIBRATION[model.name]
  rng = np.random.default_rng(0)
  x = dataset.x_train[rng.choice(len(dataset.x_train), count, replace=False)]
  return [x[i : i + batch] for i in range(0, count, batch)]


def _test_subset(model, dataset):
  if model.name not in TEST_SUBSET:
    return dataset
  rng = np.random.default_rng(0)
  idx = np.sort(rng.choice(len(dataset.x_test), TEST_SUBSET[model.name], replace=False))
  return Dataset(f"{dataset.name}[test subset]", dataset.kind, dataset.x_train,
                 dataset.y_train, dataset.x_test[idx], dataset.y_test[idx],
                 dataset.num_classes)  # fmt: skip


class _Cached:
  """Calibration statistics gathered once per model, reused for every spec."""

  def __init__(self, model, params, batches):
    self.params = params
    self.flat = flatten(params)
    self.hessians = collect_hessians(model.apply, params, batches, RULE)
    reducers = {"gram": capture.gram_reducer(), "abs": abs_mean_reducer()}
    self.awq_stats = capture.collect(model.apply, params, batches, RULE, reducers)

  def gptq(self, spec):
    def leaf(path, kernel):
      h, site = self.hessians[path]
      return gptq_kernel(kernel, h, spec, contract_dims=site.contract_dims, act_order=True,
                         path=path)  # fmt: skip

    return map_selected(leaf, self.params, RULE)

  def awq(self, spec):
    def leaf(path, kernel):
      stats, site = self.awq_stats.stats[path], self.awq_stats.sites[path]
      dims = normalize_contract_dims(site.contract_dims, kernel.ndim, path)
      (gram, count), (total, _) = stats["gram"], stats["abs"]
      codes, scale, zp, s, _ = awq_matrix(capture.kernel_matrix(kernel, dims), gram / count,
                                          total / count, spec, path=path)  # fmt: skip
      return QArray.from_codes(codes, scale, zp, spec, shape=kernel.shape, dtype=kernel.dtype,
                               contract_dims=dims, input_scale=s)  # fmt: skip

    return map_selected(leaf, self.params, RULE)


class _Evaluator:
  """Weight-only trees are scored on their dequantized weights (what `materialize` computes
  inside jit), so every row reuses the float model's compiled step; W8A8 trees run on the
  integer path."""

  def __init__(self, model, dataset):
    self.model, self.dataset = model, dataset

  def __call__(self, tree, integer_path=False):
    return evaluate_tree(self.model, tree if integer_path else materialize(tree), self.dataset)


def _record(model, method, value, reference, tree, seconds, extra):
  report = tree_report(tree)
  return Record(SUITE, model.name, method, model.metric, value, reference, report.total_bytes,
                report.float32_bytes, seconds, extra)  # fmt: skip


def _weight_only_rows(model, params, batches, evaluate, reference):
  records = []
  start = time.perf_counter()
  cached = _Cached(model, params, batches)
  calib_seconds = time.perf_counter() - start
  methods = {
    "rtn": lambda spec: quantize_params(params, RULE, spec),
    "gptq": cached.gptq,
    "awq": cached.awq,
  }
  for label, spec in SPECS.items():
    for method, compress in methods.items():
      start = time.perf_counter()
      tree = jax.block_until_ready(compress(spec))
      seconds = time.perf_counter() - start
      extra = {"bits": spec.bits, "group_size": spec.group_size, "spec": spec.describe()}
      if method == "gptq":
        extra["act_order"] = True
      if method != "rtn":
        extra["seconds_excludes_calibration"] = round(calib_seconds, 2)
      records.append(
        _record(model, f"{method} {label}", evaluate(tree), reference, tree, seconds, extra)
      )
  return records


def _w8a8_rows(model, params, batches, evaluate, reference):
  records = []
  for label, alpha in (("w8a8", None), ("w8a8 smoothquant", 0.5)):
    start = time.perf_counter()
    tree = ptq(model.apply, params, batches, RULE, QuantSpec(bits=8), activation_bits=8,
               smooth_alpha=alpha, static_activations=True)  # fmt: skip
    seconds = time.perf_counter() - start
    extra = {"activations": "int8 static absmax", "smooth_alpha": alpha}
    value = evaluate(tree, integer_path=True)
    records.append(_record(model, label, value, reference, tree, seconds, extra))
  return records


def _qat_rows(model, params, dataset, evaluate, reference):
  records = []
  for bits in (4, 2):
    spec = QuantSpec(bits=bits)
    rtn = quantize_params(params, RULE, spec)
    start = time.perf_counter()
    trained = qat_finetune(model.apply, params, dataset.x_train, dataset.y_train, RULE, spec,
                           steps=QAT_STEPS, learning_rate=3e-4, batch_size=64).params  # fmt: skip
    tree = quantize_params(trained, RULE, spec)
    seconds = time.perf_counter() - start
    extra = {"bits": bits, "steps": QAT_STEPS, "rtn_value": evaluate(rtn)}
    records.append(_record(model, f"qat int{bits}", evaluate(tree), reference, tree, seconds,
                           extra))  # fmt: skip
    if bits == 2:
      records.append(_record(model, "rtn int2", extra["rtn_value"], reference, rtn, None,
                             {"bits": 2, "spec": spec.describe()}))  # fmt: skip
  return records


def _evaluate(apply, params, dataset, metric, batch_size=256):
  """The zoo metric for an apply whose params the zoo's own shape check cannot build (Qwix)."""

  def scores(p, x, y):
    logits = apply(p, x).astype(jnp.float32)
    if metric == "accuracy":
      return jnp.sum(jnp.argmax(logits, -1) == y)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  step = jax.jit(scores)
  total, count = 0.0, 0
  for i in range(0, len(dataset.x_test), batch_size):
    y = dataset.y_test[i : i + batch_size]
    total += float(step(params, dataset.x_test[i : i + batch_size], y))
    count += y.size
  return total / count if metric == "accuracy" else math.exp(total / count)


def _qwix_eval(model, params, dataset, rules):
  import qwix

  start = time.perf_counter()
  ptq_module = qwix.quantize_model(model.module, qwix.PtqProvider(rules))
  abstract = jax.eval_shape(ptq_module.init, jax.random.key(0), model.dummy_input(1))["params"]
  qparams = jax.block_until_ready(qwix.quantize_params(params, abstract))
  seconds = time.perf_counter() - start
  value = _evaluate(lambda p, x: ptq_module.apply({"params": p}, x), qparams, dataset,
                    model.metric)  # fmt: skip
  return value, sum(int(leaf.nbytes) for leaf in jax.tree.leaves(qparams)), seconds


def _qwix_rows(model, params, dataset, reference):
  """Qwix PTQ (per-channel absmax) on the same linen module: weight-only where Qwix allows.

  Qwix's conv requires `act_qtype == weight_qtype`, so when weight-only fails on a model with
  convs, the convs are retried with activations quantized to the same type (noted in `extra`).
  """
  import qwix

  rows = []
  float_bytes = tree_report(params).float32_bytes
  for label, qtype in (("int8", "int8"), ("int4", "int4")):
    bits = int(label[3:])
    extra = {"library": "qwix 0.1.8", "bits": bits}
    attempts = [
      ("weight-only", [qwix.QuantizationRule(module_path=".*", weight_qtype=qtype)]),
      (f"convs W{bits}A{bits}, dense weight-only",
       [qwix.QuantizationRule(module_path=".*", op_names=("conv_general_dilated",),
                              weight_qtype=qtype, act_qtype=qtype),
        qwix.QuantizationRule(module_path=".*", weight_qtype=qtype)]),
      ("convs float, dense weight-only",
       [qwix.QuantizationRule(module_path=".*", op_names=("dot_general",), weight_qtype=qtype)]),
    ]  # fmt: skip
    record = Record(SUITE, model.name, f"qwix ptq {label}", model.metric, None, reference, None,
                    float_bytes, None, extra)  # fmt: skip
    for mode, rules in attempts:
      try:
        value, nbytes, seconds = _qwix_eval(model, params, dataset, rules)
      except Exception as e:  # noqa: BLE001  (a peer's failure is a result, recorded as such)
        extra[f"error ({mode})"] = f"{type(e).__name__}: {e}"[:300]
        continue
      extra.update(mode=mode, in_memory_bytes=nbytes)
      record = Record(SUITE, model.name, f"qwix ptq {label}", model.metric, value, reference,
                      nbytes, float_bytes, seconds, extra)  # fmt: skip
      break
    rows.append(record)
  return rows


def _compression_time_rows(model, params, batches):
  """One full call each (calibration included), interleaved with round-to-nearest."""
  spec = QuantSpec(bits=4)
  calls = {
    "rtn": lambda: quantize_params(params, RULE, spec),
    "ptq w8a8": lambda: ptq(
      model.apply,
      params,
      batches,
      RULE,
      QuantSpec(bits=8),
      activation_bits=8,
      static_activations=True,
    ),  # fmt: skip
    "gptq": lambda: gptq(model.apply, params, batches, RULE, spec, act_order=True),
    "awq": lambda: awq(model.apply, params, batches, RULE, spec),
  }
  seconds = {}
  for name, call in calls.items():
    start = time.perf_counter()
    jax.block_until_ready(call())
    seconds[name] = time.perf_counter() - start
  rows = []
  for name, secs in seconds.items():
    label = "int8 w8a8" if name == "ptq w8a8" else "int4"
    rows.append(Record(
      SUITE, model.name, f"compress {name} {label}", "seconds", secs, seconds["rtn"], None, None,
      secs, {"seconds_vs_rtn": round(secs / seconds["rtn"], 2),
             "calibration_windows": CALIBRATION[model.name][0]},
    ))  # fmt: skip
  return rows


def run() -> list[Record]:
  records = []
  for name in MODELS:
    model = models.get_model(name)
    full = data.get_dataset(model.data)
    dataset = _test_subset(model, full)
    params = models.pretrained(model, progress=False)
    batches = _calibration(model, full)
    evaluate = _Evaluator(model, dataset)
    reference = evaluate(params)
    records.append(_record(model, "float32", reference, reference, params, None, {}))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # group fallbacks on small convs are expected
      records += _weight_only_rows(model, params, batches, evaluate, reference)
      records += _w8a8_rows(model, params, batches, evaluate, reference)
      records += _qat_rows(model, params, full, evaluate, reference)
      records += _qwix_rows(model, params, dataset, reference)
      if name == "tiny-lm":
        records += _compression_time_rows(model, params, batches)
  return records
