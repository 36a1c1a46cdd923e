"""Hinton et al.'s distillation result at small scale on digits, and the step's cost.

Three models, as in the paper's MNIST table: the zoo's `digits-cnn` teacher, an MLP
student (64-128-10, 16x fewer params) trained on labels only, and the same student trained
with soft targets from the teacher (T=4, alpha=0.9). Both students use the same loop,
optimizer, steps and seeds; only the loss differs. Values are test-set error counts (of
360), averaged over seeds.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxshrink import data, models
from jaxshrink.bench import Record, best_time
from jaxshrink.distill import DistillLoss, distill, distill_step
from jaxshrink.distill.models import digits_student
from jaxshrink.distill.train import student_optimizer
from jaxshrink.report import tree_report

SUITE = "distill"
DESCRIPTION = (
  "Hinton KD on digits: test error counts (of 360) for the digits-cnn teacher, an MLP "
  "student without KD and the same student with KD (T=4, alpha=0.9), mean over 3 seeds, on "
  "the full transfer set and a reduced one; and the distillation step time vs the plain "
  "student step (`time_ratio`, interleaved, best of 5)."
)
SEEDS = (0, 1, 2)
STEPS = 800
TRANSFER_SIZES = (None, 300)  # None: all 1437 training images
KD = DistillLoss(temperature=4.0, alpha=0.9)
NO_KD = DistillLoss(temperature=1.0, alpha=0.0)  # hard labels only


def _errors(model, params, dataset) -> int:
  return round((1.0 - models.evaluate(model, params, dataset)) * dataset.num_test)


def _step_timing(teacher, tp, student, dataset) -> tuple[float, float]:
  """Seconds per 20 steps of the distillation step and of the plain CE step."""
  x = jnp.asarray(dataset.x_train[:64])
  y = jnp.asarray(dataset.y_train[:64])
  opt = student_optimizer(1e-3, 1000)
  builder = distill_step(student.apply, teacher.apply, opt, KD, donate=False)
  state = builder.init(student.init(jax.random.key(0)), tp, x, key=jax.random.key(0))

  @jax.jit
  def plain(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(lambda p: models.cross_entropy_loss(student.apply(p, x), y))(
      params
    )
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def run_kd():
    s = state
    for _ in range(20):
      s, m = builder.step(s, tp, x, y)
    return m["loss"]

  def run_plain():
    p, o = state.params, state.opt_state
    for _ in range(20):
      p, o, loss = plain(p, o, x, y)
    return loss

  run_kd(), run_plain()  # compile
  kd_t, plain_t = float("inf"), float("inf")
  for _ in range(2):  # interleaved
    kd_t = min(kd_t, best_time(run_kd))
    plain_t = min(plain_t, best_time(run_plain))
  return kd_t, plain_t


def run() -> list[Record]:
  dataset = data.get_dataset("digits")
  teacher = models.get_model("digits-cnn")
  tp = models.pretrained(teacher)
  student = digits_student()
  teacher_errors = _errors(teacher, tp, dataset)
  t_report = tree_report(tp)
  s_report = tree_report(student.init(jax.random.key(0)))
  records = []
  for size in TRANSFER_SIZES:
    transfer = "all 1437 train images" if size is None else f"reduced: {size} of 1437 train images"
    records.append(Record(
      suite=SUITE, model="digits-cnn", method="teacher", metric="test_errors",
      value=float(teacher_errors), reference_value=float(teacher_errors),
      size_bytes=t_report.total_bytes, float32_bytes=t_report.float32_bytes, seconds=None,
      extra={"params": t_report.num_params, "test_examples": dataset.num_test},
    ))  # fmt: skip
    for method, loss in (("student without KD", NO_KD), ("student with KD", KD)):
      errors, start = [], time.perf_counter()
      for seed in SEEDS:
        params = distill(student, teacher.apply, tp, dataset, loss=loss, steps=STEPS,
                         key=jax.random.key(seed), transfer_size=size, augment=None)  # fmt: skip
        errors.append(_errors(student, params, dataset))
      records.append(Record(
        suite=SUITE, model="digits-student", method=method, metric="test_errors",
        value=float(np.mean(errors)), reference_value=float(teacher_errors),
        size_bytes=s_report.total_bytes, float32_bytes=s_report.float32_bytes,
        seconds=time.perf_counter() - start,
        extra={"transfer_set": transfer, "errors_per_seed": "/".join(map(str, errors)),
               "params": s_report.num_params, "steps": STEPS,
               "temperature": loss.temperature, "alpha": loss.alpha},
      ))  # fmt: skip
  kd_t, plain_t = _step_timing(teacher, tp, student, dataset)
  records.append(Record(
    suite=SUITE, model="digits-student", method="distill step vs plain step", metric="seconds",
    value=kd_t / 20, reference_value=plain_t / 20, size_bytes=None, float32_bytes=None,
    seconds=kd_t, extra={"time_ratio": kd_t / plain_t, "batch": 64,
                         "note": "KD step also runs the CNN teacher forward"},
  ))  # fmt: skip
  return records
