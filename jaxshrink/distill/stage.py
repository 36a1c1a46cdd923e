"""The `distill` recipe stage: train a student from the recipe's model (or another teacher).

```yaml
- distill: {student: digits-student, temperature: 4.0, alpha: 0.9}
- distill:                       # a 3-layer MiniLM student: embedding cosine + hidden states
    student: minilm-l3-student
    losses: {logit_cosine: 1.0}
    features:                    # student module -> teacher module (`tapped_apply` paths)
      - {student: encoder/layer_2, teacher: encoder/layer_5, kind: mse, weight: 0.1}
    pad_id: 0                    # padding tokens never count in a feature loss
```

The stage replaces `pipeline.model` with the student and `pipeline.tree` with its trained
params; `float_model` / `float_params` stay the reference the result is measured against.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxshrink.compose import CompositionError, made_by
from jaxshrink.distill.objective import PAIR_KINDS, DistillLoss, FeaturePair
from jaxshrink.distill.taps import tapped_apply
from jaxshrink.distill.train import distill
from jaxshrink.encoding import is_encoding
from jaxshrink.errors import UsageError
from jaxshrink.pipeline import REQUIRED, Pipeline, check_positive, register_stage
from jaxshrink.tree import flatten

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
  "features": [],
  "pad_id": None,
}
FEATURE_KEYS = ("student", "teacher", "kind", "weight")


def feature_pairs(features: Any) -> tuple[FeaturePair, ...]:
  """`FeaturePair`s from the stage's `features` list; the tap names are the module paths.

  Each entry is `{student: <module path>, teacher: <module path>, kind: mse, weight: 1.0}`.

  Raises:
    UsageError: an entry is not a mapping, has unknown or missing keys, or a bad kind/weight.
  """
  if not isinstance(features, list):
    raise UsageError(f"`features` of stage `distill` must be a list of mappings; got {features!r}.")
  pairs = []
  for i, entry in enumerate(features):
    where = f"`features[{i}]` of stage `distill`"
    if not isinstance(entry, dict):
      raise UsageError(f"{where} must be a mapping like {{student: encoder/layer_0, teacher: "
                       f"encoder/layer_1}}; got {entry!r}.")  # fmt: skip
    unknown = sorted(set(entry) - set(FEATURE_KEYS))
    if unknown:
      raise UsageError(f"Unknown key(s) {unknown} in {where}; valid: {', '.join(FEATURE_KEYS)}.")
    for key in ("student", "teacher"):
      if not isinstance(entry.get(key), str) or not entry[key].strip("/"):
        raise UsageError(f"{where} needs `{key}`: a module path such as encoder/layer_2; got "
                         f"{entry.get(key)!r}.")  # fmt: skip
    kind = entry.get("kind", "mse")
    if kind not in PAIR_KINDS:
      raise UsageError(f"`kind` in {where} must be one of {list(PAIR_KINDS)}; got {kind!r}.")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
      raise UsageError(f"`weight` in {where} must be a number >= 0; got {weight!r}.")
    pairs.append(FeaturePair("s:" + entry["student"], "t:" + entry["teacher"], kind, float(weight)))
  return tuple(pairs)


def _taps(pairs: tuple[FeaturePair, ...], prefix: str) -> dict[str, str]:
  names = [p.student if prefix == "s:" else p.teacher for p in pairs]
  return {name: name[len(prefix) :] for name in names}


def loss_from_options(options: dict[str, Any]) -> DistillLoss:
  """The `DistillLoss` a stage's `temperature`, `alpha`, `losses` and `features` describe."""
  weights = options["losses"]
  if not isinstance(weights, dict):
    raise UsageError(f"`losses` of stage `distill` must map loss names to weights; got "
                     f"{weights!r}.")  # fmt: skip
  for name, weight in weights.items():
    if name not in LOSS_TERMS:
      raise UsageError(
        f"Unknown loss `{name}` in `losses` of stage `distill`; valid: {', '.join(LOSS_TERMS)}. "
        "Hidden-state losses go in `features` (student and teacher module paths)."
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
      pairs=feature_pairs(options["features"]),
    )
  except ValueError as e:
    raise UsageError(f"stage `distill`: {e}") from None


@register_stage(
  "distill",
  options=DISTILL_OPTIONS,
  doc="Train a student (zoo name or module:factory) from the current model as teacher with "
  "Hinton KD (temperature, alpha), logit MSE/cosine and hidden-state `features` matched by "
  "module path; the student replaces the model.",
)
def distill_stage(pipeline: Pipeline, options: dict[str, Any]) -> Pipeline:
  from jaxshrink import models

  loss = loss_from_options(options)
  for name in ("steps", "batch_size", "transfer_size"):
    check_positive(options, name, "distill", nullable=True)
  check_positive(options, "learning_rate", "distill", kind=float, nullable=True)
  compressed = [p for p, leaf in flatten(pipeline.tree).items() if is_encoding(leaf)]
  if compressed:
    leaf = flatten(pipeline.tree)[compressed[0]]
    raise CompositionError(
      f"`distill` cannot run after `{made_by(leaf)}` (`{compressed[0]}`: {leaf.describe()}): "
      "distill trains a new student, so the earlier stage's "
      "work would be thrown away. Distill first and compress the student after, or use "
      "`recover` to distill the float model into the compressed one."
    )
  if options["teacher"] is None:
    teacher, teacher_params = pipeline.model, pipeline.tree
  else:
    teacher = models.load_model(options["teacher"])
    teacher_params = models.pretrained(teacher, progress=False)
  student = models.load_model(options["student"])
  pad_id = options["pad_id"]
  if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)):
    raise UsageError(f"`pad_id` of stage `distill` must be null or a token id; got {pad_id!r}.")
  teacher_apply, trained = teacher.apply, student
  if loss.pairs:
    # Both models return {"logits", <module path>: output}; the student's own apply is swapped
    # for the tapped one only while training.
    teacher_apply = tapped_apply(teacher, _taps(loss.pairs, "t:"), pad_id=pad_id, who="teacher")
    trained = dataclasses.replace(
      student, apply=tapped_apply(student, _taps(loss.pairs, "s:"), pad_id=pad_id, who="student")
    )
  key, sub = jax.random.split(pipeline.key)
  params = distill(
    trained,
    teacher_apply,
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
    pipeline,
    model=student,
    tree=params,
    key=key,
    model_source=options["student"],
  )
