"""The `distill` recipe stage: train a student from the recipe's model (or another teacher).

```yaml
- distill: {student: "jaxshrink.distill.models:digits_student", temperature: 4.0, alpha: 0.9}
```

The stage replaces `pipeline.model` with the student and `pipeline.tree` with its trained
params; `float_model` / `float_params` stay the reference the result is measured against.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxshrink.distill.objective import DistillLoss
from jaxshrink.distill.train import distill
from jaxshrink.errors import UsageError
from jaxshrink.recipes import REQUIRED, Pipeline, register_stage

LOSS_TERMS = ("kd", "logit_mse", "logit_cosine")

DISTILL_OPTIONS: dict[str, Any] = {
  "teacher": None,
  "student": REQUIRED,
  "temperature": 4.0,
  "alpha": 0.9,
  "losses": {"kd": 1.0},
  "steps": None,
  "learning_rate": None,
  "batch_size": None,
  "transfer_size": None,
  "augment": True,
}


def loss_from_options(options: dict[str, Any]) -> DistillLoss:
  """The `DistillLoss` a stage's `temperature`, `alpha` and `losses` describe."""
  weights = options["losses"]
  for name, weight in weights.items():
    if name not in LOSS_TERMS:
      raise UsageError(
        f"Unknown loss `{name}` in `losses` of stage `distill`; valid: {', '.join(LOSS_TERMS)}. "
        "Feature and attention losses need models that return intermediates: use the Python "
        "API (`DistillLoss(pairs=...)`)."
      )
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
      raise UsageError(f"`losses.{name}` of stage `distill` must be a weight >= 0; got {weight!r}.")
  try:
    return DistillLoss(
      temperature=options["temperature"],
      alpha=options["alpha"],
      kd=float(weights.get("kd", 0.0)),
      logit_mse=float(weights.get("logit_mse", 0.0)),
      logit_cosine=float(weights.get("logit_cosine", 0.0)),
    )
  except ValueError as e:
    raise UsageError(f"stage `distill`: {e}") from None


def _positive_int(options: dict[str, Any], name: str) -> None:
  value = options[name]
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
    raise UsageError(f"`{name}` of stage `distill` must be null or a positive int; got {value!r}.")


@register_stage(
  "distill",
  options=DISTILL_OPTIONS,
  doc="Train a student (zoo name or module:factory) from the current model as teacher with "
  "Hinton KD (temperature, alpha); the student replaces the model.",
)
def distill_stage(pipeline: Pipeline, options: dict[str, Any]) -> Pipeline:
  from jaxshrink import models

  loss = loss_from_options(options)
  for name in ("steps", "batch_size", "transfer_size"):
    _positive_int(options, name)
  if options["learning_rate"] is not None and not options["learning_rate"] > 0:
    raise UsageError(f"`learning_rate` of stage `distill` must be > 0; got "
                     f"{options['learning_rate']!r}.")  # fmt: skip
  if options["teacher"] is None:
    teacher, teacher_params = pipeline.model, pipeline.tree
  else:
    teacher = models.load_model(options["teacher"])
    teacher_params = models.pretrained(teacher, progress=False)
  student = models.load_model(options["student"])
  key, sub = jax.random.split(pipeline.key)
  params = distill(
    student,
    teacher.apply,
    teacher_params,
    pipeline.dataset,
    loss=loss,
    steps=options["steps"],
    learning_rate=options["learning_rate"],
    batch_size=options["batch_size"],
    key=sub,
    transfer_size=options["transfer_size"],
    augment="model" if options["augment"] else None,
  )
  return dataclasses.replace(
    pipeline, model=student, tree=params, key=key, model_source=options["student"]
  )
