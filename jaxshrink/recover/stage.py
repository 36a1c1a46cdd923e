"""The `recover` recipe stage: distill the float model into the compressed tree, kept compressed.

```yaml
- prune: {target: ".*kernel", sparsity: 0.5, method: sparsegpt}
- recover:                       # masks, quantization grids and low-rank ranks are kept
    steps: 400
    learning_rate: 1.0e-4
    losses: {logit_cosine: 1.0}  # embeddings; classifiers default to {kd: 1.0} (soft targets)
    features:                    # hidden states; `teacher` defaults to the same module path
      - {student: encoder/layer_5, kind: mse, weight: 0.01}
    data: corpus                 # auto | corpus | everyday | wordnet | train
    teacher_cache: auto          # keep the float model's outputs after the first epoch
```

`data: corpus` (the default for token-id models with an embedding dataset) trains on the
offline transfer corpus, `jaxshrink.data.corpus` (over 10,000 English sentences, MiniLM token
ids), `data: everyday` on its everyday-English half only (the fortune file's sentences, the
register of most sentence-embedding use), `data: wordnet` on WordNet's usage examples
(`jaxshrink.data.wordnet`: about 29,700 short plain sentences, a set of their own); `data: train`
on the dataset's training split, with
the model's augmentation unless `augment: false`. The teacher is always the recipe's float
model (`pipeline.float_model`, `pipeline.float_params`); the stage replaces `pipeline.tree`
only. After a `structured` stage that dropped layers, a feature without `teacher` pairs each
renumbered layer with the float layer it was cut from (the `kept_layers` of that stage's log:
with layer 2 dropped, `encoder/layer_2` learns from the float `encoder/layer_3`). Its log entry
says which leaves trained and which stayed frozen, and why, and which float module each
feature learned from.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import numpy as np

from jaxshrink.distill.stage import loss_from_options
from jaxshrink.distill.taps import tapped_apply
from jaxshrink.errors import UsageError
from jaxshrink.pipeline import (
  Pipeline,
  check_positive,
  reads_corpus_tokens,
  register_stage,
  transfer_corpus,
)
from jaxshrink.recover.train import recover
from jaxshrink.tree import Rule

DATA_CHOICES = ("auto", "corpus", "everyday", "wordnet", "train")
RECOVER_OPTIONS: dict[str, Any] = {
  "steps": None,
  "learning_rate": None,
  "batch_size": None,
  "losses": None,
  "temperature": 2.0,
  "features": [],
  "data": "auto",
  "augment": True,
  "pad_id": None,
  "teacher_cache": None,  # auto; true or false (any type here, checked by the stage)
  "target": ".*",
  "exclude": ".*embedding",
}
# Measured on digits-cnn and minilm-l6 (see benchmarks/recover.py): 300 steps of 32 recover
# most of what one-shot compression lost within a few CPU minutes.
DEFAULT_STEPS = 300
DEFAULT_BATCH = 32
# Fine-tuning an already trained model: a fraction of its own training rate, which would
# otherwise undo more than it recovers in the first steps.
LEARNING_RATE_FRACTION = 0.5
FEATURE_KEYS = ("student", "teacher", "kind", "weight")
STAGE = "stage `recover`"


def renumbered_layers(log: tuple[dict[str, Any], ...]) -> tuple[str, list[int]] | None:
  """`(layer path template, kept float layers)` after `structured` stages, so that the
  compressed model's layer i is the float model's layer `kept[i]`; else None.

  Two structured stages compose (the second numbers the first's layers). None after a
  `distill` stage: a student's layers are numbered its own way.
  """
  if any(entry.get("stage") == "distill" for entry in log):
    return None
  layers = None
  for entry in log:
    found = entry.get("structured", {})
    if "layer_path" in found:
      kept = list(found["kept_layers"])
      layers = (found["layer_path"], kept if layers is None else [layers[1][i] for i in kept])
  return layers


def _default_teacher(student: Any, layers: tuple[str, list[int]] | None) -> Any:
  """The float module a `student` path is distilled from: the same path, with a renumbered
  layer's index replaced by the float layer it was cut from."""
  if layers is None or not isinstance(student, str):
    return student
  template, kept = layers
  prefix, suffix = template.split("{}")
  found = re.fullmatch(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + r"(/.*)?", student)
  if found is None or int(found.group(1)) >= len(kept):
    return student  # not a layer path, or no such layer (the tap reports it)
  return template.format(kept[int(found.group(1))]) + (found.group(2) or "")


def _features(features: Any, layers: tuple[str, list[int]] | None = None) -> list[dict[str, Any]]:
  """`features` entries as distill's mappings; a path alone, or no `teacher`, pairs a module
  with the same module of the float model (the two share one architecture), or after a
  `structured` stage that dropped layers, with the float layer it was cut from."""
  if not isinstance(features, list):
    raise UsageError(f"`features` of {STAGE} must be a list of module paths or mappings; got "
                     f"{features!r}.")  # fmt: skip
  out = []
  for i, entry in enumerate(features):
    if isinstance(entry, str):
      entry = {"student": entry}
    if isinstance(entry, dict) and "teacher" not in entry and "student" in entry:
      entry = {**entry, "teacher": _default_teacher(entry["student"], layers)}
    if isinstance(entry, dict):
      unknown = sorted(set(entry) - set(FEATURE_KEYS))
      if unknown:
        raise UsageError(f"Unknown key(s) {unknown} in `features[{i}]` of {STAGE}; valid: "
                         f"{', '.join(FEATURE_KEYS)}.")  # fmt: skip
    out.append(entry)
  return out


def _loss(options: dict[str, Any], metric: str, layers: tuple[str, list[int]] | None):
  losses = options["losses"]
  if losses is None:
    losses = {"logit_cosine": 1.0} if metric == "cosine" else {"kd": 1.0}
  features = _features(options["features"], layers)
  try:
    return loss_from_options(
      {"temperature": options["temperature"], "alpha": 1.0, "losses": losses,
       "features": features}
    )  # fmt: skip
  except UsageError as e:
    raise UsageError(str(e).replace("stage `distill`", STAGE)) from None


def _transfer_data(pipeline: Pipeline, choice: str) -> tuple[np.ndarray, str, str]:
  """`(inputs, "corpus" or "train", description for the log)`."""
  dataset = pipeline.dataset
  if choice == "auto":
    choice = "corpus" if reads_corpus_tokens(pipeline) else "train"
  if choice == "wordnet":
    ids = transfer_corpus(pipeline, "recover", "data", "wordnet")
    # Not "corpus ...": search's `validation_data: auto` may still verify on corpus sentences.
    return ids, "corpus", f"WordNet usage examples ({ids.shape[0]} sentences)"
  if choice in ("corpus", "everyday"):
    from jaxshrink.data.corpus import transfer_sentences

    part = "all" if choice == "corpus" else "everyday"
    ids = transfer_corpus(pipeline, "recover", "data", part)
    # "corpus" starts the description either way: search's `validation_data: auto` reads it to
    # know the corpus' sentences were trained on.
    half = "" if part == "all" else ", everyday half"
    described = f"corpus{half} ({ids.shape[0]} of {len(transfer_sentences())} sentences)"
    return ids, "corpus", described
  x = np.asarray(dataset.x_train)
  if x.shape[0] == 0:
    raise UsageError(
      f"`data: train` of {STAGE} reads the training split, and {dataset.name!r} has none. Give "
      "`x_train` in the data, or use `data: corpus` for a MiniLM-tokenized text model."
    )
  return x, choice, f"train ({x.shape[0]} examples of {dataset.name})"


@register_stage(
  "recover",
  options=RECOVER_OPTIONS,
  doc="Distill the float model into the compressed tree (logit/embedding losses and hidden-state "
  "`features`), keeping masks, quantization grids (QAT on the stored specs) and low-rank ranks; "
  "`data: corpus` uses the offline transfer corpus, `everyday` its everyday-English half, "
  "`wordnet` WordNet's usage examples, `train` the training split.",
)
def recover_stage(pipeline: Pipeline, options: dict[str, Any]) -> Pipeline:
  model = pipeline.model
  check_positive(options, "steps", "recover", nullable=True)
  check_positive(options, "batch_size", "recover", nullable=True)
  check_positive(options, "learning_rate", "recover", kind=float, nullable=True)
  if options["data"] not in DATA_CHOICES:
    raise UsageError(f"`data` of {STAGE} must be one of {list(DATA_CHOICES)}; got "
                     f"{options['data']!r}.")  # fmt: skip
  pad_id = options["pad_id"]
  if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)):
    raise UsageError(f"`pad_id` of {STAGE} must be null or a token id; got {pad_id!r}.")
  teacher_cache = "auto" if options["teacher_cache"] is None else options["teacher_cache"]
  if not (isinstance(teacher_cache, bool) or teacher_cache == "auto"):
    raise UsageError(f"`teacher_cache` of {STAGE} must be auto, true or false; got "
                     f"{teacher_cache!r}.")  # fmt: skip
  if not isinstance(options["augment"], bool):
    raise UsageError(f"`augment` of {STAGE} must be true or false; got {options['augment']!r}.")
  try:
    rule = Rule(include=options["target"], exclude=options["exclude"], min_ndim=0)
  except (TypeError, ValueError) as e:
    raise UsageError(f"`target`/`exclude` of {STAGE}: {e}") from None
  loss = _loss(options, model.metric, renumbered_layers(pipeline.log))
  x, source, described = _transfer_data(pipeline, options["data"])
  if pad_id is None:  # the corpus' token ids pad with [PAD] = 0; other data with the model's
    pad_id = 0 if source == "corpus" else model.pad_id
  student_apply, teacher_apply = model.apply, pipeline.float_model.apply
  if loss.pairs:
    # Both return {"logits", <module path>: output}; padding never counts in a feature loss.
    student_taps = {p.student: p.student[2:] for p in loss.pairs}
    teacher_taps = {p.teacher: p.teacher[2:] for p in loss.pairs}
    student_apply = tapped_apply(model, student_taps, pad_id=pad_id, who="student")
    teacher_apply = tapped_apply(pipeline.float_model, teacher_taps, pad_id=pad_id, who="teacher")
  augment = None
  if options["augment"] and not np.issubdtype(x.dtype, np.integer):
    augment = model.augment
  learning_rate = options["learning_rate"]
  if learning_rate is None:
    learning_rate = LEARNING_RATE_FRACTION * model.learning_rate
  key, sub = jax.random.split(pipeline.key)
  result = recover(
    student_apply,
    pipeline.tree,
    teacher_apply,
    pipeline.float_params,
    x,
    loss=loss,
    steps=options["steps"] or DEFAULT_STEPS,
    learning_rate=float(learning_rate),
    batch_size=options["batch_size"] or DEFAULT_BATCH,
    rule=rule,
    augment=augment,
    pad_id=pad_id,
    teacher_cache=teacher_cache,
    key=sub,
  )
  found = {
    "recovered": {
      "data": described,
      "trained": len(result.trained),
      "frozen": result.frozen,
      "teacher_cache": result.teacher_cache,
      "features": [[p.student[2:], p.teacher[2:]] for p in loss.pairs],  # (student, float)
      "loss_first": round(float(result.losses[0]), 6),
      "loss_last": round(float(np.mean(result.losses[-10:])), 6),
    }
  }
  return dataclasses.replace(pipeline, tree=result.tree, key=key, log=(*pipeline.log, found))
