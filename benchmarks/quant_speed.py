"""Quantization speed and memory: QAT step vs float and AQT, W8A8 matmul vs f32, bytes, PTQ time.

Every timing is a ratio against a baseline timed interleaved in the same run (best of N).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxshrink import data, models
from jaxshrink.bench import Record, interleaved_best
from jaxshrink.quant import QuantSpec, quantize
from jaxshrink.quant.aqt_interop import aqt_dot_general
from jaxshrink.quant.dot_general import QuantDotGeneral
from jaxshrink.quant.ptq import ptq
from jaxshrink.quant.serve import qarray_matmul

SUITE = "quant_speed"
DESCRIPTION = (
  "QAT int8 training step on digits-cnn (Dense layers quantized) relative to the plain float "
  "step and to AQT (aqtp 0.9.0) under the same config: `fwd-int8` = int8 forward, float "
  "straight-through backward; `fwd+bwd-int8` = AQT's fully_quantized(8, 8) (both reuse the "
  "forward's int8 codes in the backward dots). W8A8 1024^3 dense layer (dynamic per-token "
  "activation quantization included) vs f32. Device bytes per weight. PTQ wall-clock. "
  "Timings: best of 9 interleaved rounds (PTQ: one run)."
)


def _interleaved(fns: dict, rounds: int = 5, inner: int = 10) -> dict[str, float]:
  for fn in fns.values():
    jax.block_until_ready(fn())
  return interleaved_best(fns, rounds, inner)


def _qat_rows() -> list[Record]:
  model = models.get_model("digits-cnn")
  dataset = data.get_dataset(model.data)
  params = models.pretrained(model, progress=False)
  x = jnp.asarray(dataset.x_train[: model.batch_size])
  y = jnp.asarray(dataset.y_train[: model.batch_size])
  opt = optax.adam(1e-3)
  rng = {"params": jax.random.key(0)}

  def make_step(dot_general, aqt=False):
    module = model.module if dot_general is None else model.module.clone(dot_general=dot_general)

    def loss(p):
      logits = module.apply({"params": p}, x, rngs=rng) if aqt else module.apply({"params": p}, x)
      return models.cross_entropy_loss(logits, y)

    @jax.jit
    def step(p, s):
      g = jax.grad(loss)(p)
      u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), s

    state = opt.init(params)
    return lambda: step(params, state)

  records = []
  for config, bwd in (("fwd-int8", None), ("fwd+bwd-int8", 8)):
    mode = "int_full" if bwd else "int"
    fns = {
      "float": make_step(None),
      "jaxshrink": make_step(QuantDotGeneral(mode=mode)),
      "aqt": make_step(aqt_dot_general(8, bwd), aqt=True),
    }
    t = _interleaved(fns, rounds=9)
    records.append(Record(
      suite=SUITE, model="digits-cnn", method=f"QAT step {config}", metric="seconds",
      value=t["jaxshrink"], reference_value=t["float"], size_bytes=None, float32_bytes=None,
      seconds=t["jaxshrink"],
      extra={"ratio_vs_float": t["jaxshrink"] / t["float"],
             "aqt_ratio_vs_float": t["aqt"] / t["float"],
             "ratio_vs_aqt": t["jaxshrink"] / t["aqt"]},
    ))  # fmt: skip
  return records


def _matmul_rows(m: int = 1024, k: int = 1024, n: int = 1024) -> list[Record]:
  x = jax.random.normal(jax.random.key(0), (m, k))
  w = jax.random.normal(jax.random.key(1), (k, n))
  q = quantize(w, QuantSpec(bits=8))
  q = q.__class__(**{**q.__dict__, "act_bits": 8})
  xi = jnp.ones((m, k), jnp.int8)
  f32 = jax.jit(lambda x, w: x @ w)
  w8a8 = jax.jit(qarray_matmul)
  raw = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.int32))
  t = _interleaved({
    "f32": lambda: f32(x, w), "w8a8": lambda: w8a8(x, q), "int8_dot": lambda: raw(xi, q.codes),
  }, rounds=9, inner=5)  # fmt: skip
  return [Record(
    suite=SUITE, model=f"dense {m}x{k}x{n}", method="W8A8 dynamic per-token", metric="seconds",
    value=t["w8a8"], reference_value=t["f32"], size_bytes=q.nbytes, float32_bytes=4 * k * n,
    seconds=t["w8a8"],
    extra={"speedup_vs_f32": t["f32"] / t["w8a8"],
           "plain_int8_dot_speedup": t["f32"] / t["int8_dot"]},
  )]  # fmt: skip


def _memory_rows() -> list[Record]:
  w = jax.random.normal(jax.random.key(2), (4096, 1024))
  rows = []
  for label, spec in (("int8 per-channel", QuantSpec(bits=8)),
                      ("int4 g128", QuantSpec(bits=4, group_size=128)),
                      ("int4 g64", QuantSpec(bits=4, group_size=64))):  # fmt: skip
    q = jax.device_put(quantize(w, spec))
    device = sum(a.nbytes for a in jax.tree.leaves(q))  # what is resident on the device
    rows.append(Record(
      suite=SUITE, model="kernel 4096x1024", method=label, metric="bytes_per_weight",
      value=device / w.size, reference_value=4.0, size_bytes=device, float32_bytes=4 * w.size,
      seconds=None, extra={"codes_dtype": str(q.codes.dtype), "scale_dtype": str(q.scale.dtype)},
    ))  # fmt: skip
  return rows


def _ptq_rows() -> list[Record]:
  model = models.get_model("digits-cnn")
  dataset = data.get_dataset(model.data)
  params = models.pretrained(model, progress=False)
  batches = [dataset.x_train[i : i + 128] for i in range(0, 1024, 128)]
  start = time.perf_counter()
  # Static scales: the calibration pass this row times (dynamic scales skip it).
  ctree = ptq(model.apply, params, batches, ".*kernel", QuantSpec(bits=8), activation_bits=8,
              static_activations=True)  # fmt: skip
  jax.block_until_ready(jax.tree.leaves(ctree))
  seconds = time.perf_counter() - start
  return [Record(
    suite=SUITE, model="digits-cnn", method="W8A8 PTQ (8 calibration batches)", metric="seconds",
    value=seconds, reference_value=None, size_bytes=None, float32_bytes=None, seconds=seconds,
    extra={},
  )]  # fmt: skip


def _qat_recovery_rows() -> list[Record]:
  """Round-to-nearest vs QAT (300 Adam steps from the float params) at 3 and 2 bits."""
  import warnings

  from jaxshrink.encoding import materialize
  from jaxshrink.quant.ptq import quantize_params
  from jaxshrink.quant.qat import qat_finetune
  from jaxshrink.report import tree_report

  model = models.get_model("digits-cnn")
  dataset = data.get_dataset(model.data)
  params = models.pretrained(model, progress=False)
  evaluate = jax.jit(lambda t, x: model.apply(materialize(t), x))

  def accuracy(tree):
    logits = evaluate(tree, jnp.asarray(dataset.x_test))
    return float((np.asarray(logits).argmax(-1) == dataset.y_test).mean())

  reference = accuracy(params)
  rows = []
  for bits in (3, 2):
    spec = QuantSpec(bits=bits)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      rtn = quantize_params(params, ".*kernel", spec)
      start = time.perf_counter()
      trained = qat_finetune(model.apply, params, dataset.x_train, dataset.y_train, ".*kernel",
                             spec, steps=300, learning_rate=3e-4, batch_size=64).params  # fmt: skip
      qat = quantize_params(trained, ".*kernel", spec)
      seconds = time.perf_counter() - start
    for method, tree, secs in ((f"RTN int{bits}", rtn, None), (f"QAT int{bits}", qat, seconds)):
      report = tree_report(tree)
      rows.append(Record(
        suite=SUITE, model="digits-cnn", method=method, metric="accuracy", value=accuracy(tree),
        reference_value=reference, size_bytes=report.total_bytes,
        float32_bytes=report.float32_bytes, seconds=secs, extra={"weight_bits": bits},
      ))  # fmt: skip
  return rows


def run() -> list[Record]:
  np.random.seed(0)
  return _qat_rows() + _matmul_rows() + _memory_rows() + _ptq_rows() + _qat_recovery_rows()
