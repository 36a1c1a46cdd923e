"""Recipes: a YAML file that names a model, its data and a list of stages.

```yaml
model: digits-cnn        # zoo name, or "package.module:factory" (your model, see below)
params: null             # float checkpoint dir; null = the zoo model's trained params
data: digits             # zoo data name, "package.module:factory", a .npz/.txt file or a
                         # directory of .npy files
metric: null             # null = the model's; accuracy/perplexity/cosine, "pkg.mod:fn" or
                         # {fn: "pkg.mod:fn", higher_is_better: true}
training: null           # your model's {train_steps, learning_rate, batch_size}
pad_id: null             # your token-id model's padding id: calibration and recover skip it
stages:                  # run in order on the parameter tree
  - cast: {target: ".*kernel", dtype: bfloat16}
export: {}               # {evaluate: true, serving: auto}: measure, pick the serving mode
```

`export.serving` is `auto` (time every serving mode against float on a test batch and record
the fastest, `jaxshrink.serving.recommend`), one mode (time that one), or null (time nothing).
The result goes into the checkpoint's metrics as `serving`; `jaxshrink eval` runs that mode.

Your own model: `model: "pkg.mod:factory"` may return an `nnx.Module` instance, a `(linen
module, variables)` pair or an `(apply, params)` pair with its trained weights (or a
`ZooModel`); `data` is then required, and `metric` defaults to the data's kind (accuracy for
classification). Only stages that train (QAT, gradual/RigL/SET pruning, factorize with
`finetune_steps`) need `training` fields, and say which one is missing. Calibration and
training read the data's train split; evaluation reads its test split only.

A recipe is validated completely before anything runs: an unknown top-level
key, stage kind or stage option is a `UsageError` naming it and listing the
valid ones. Stage kinds are registered by `jaxshrink.stages`; each is a thin
adapter over a public function, so a recipe does nothing the Python API can't.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from jaxshrink.errors import JaxshrinkError, UsageError
from jaxshrink.evaluation import SERVING_BATCH, evaluate_metrics, evaluate_tree, timing_batch
from jaxshrink.pipeline import (
  REQUIRED,
  STAGES,
  Pipeline,
  StageKind,
  check_options,
  run_stage,
  suggest,
)
from jaxshrink.report import TreeReport, tree_report

TOP_LEVEL: dict[str, Any] = {
  "name": None,
  "model": REQUIRED,
  "params": None,
  "data": None,
  "metric": None,
  "training": None,
  "pad_id": None,
  "seed": 0,
  "stages": [],
  "export": {},
}
EXPORT_OPTIONS: dict[str, Any] = {"evaluate": True, "serving": "auto"}


def stage_kinds() -> dict[str, StageKind]:
  """Every registered stage kind by name (the built-in ones register on import)."""
  import jaxshrink.stages  # noqa: F401  (imports every stage module, which registers itself)

  return dict(STAGES)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A validated recipe; `stages` holds each kind with its full options."""

  model: str
  params: str | None
  data: str | None
  seed: int
  stages: tuple[tuple[str, dict[str, Any]], ...]
  export: dict[str, Any]
  name: str | None
  raw: dict[str, Any]
  metric: Any = None
  training: dict[str, Any] | None = None
  pad_id: int | None = None


def parse_recipe(raw: Any, *, source: str = "recipe") -> Recipe:
  """Validates a recipe mapping (as read from YAML) and fills in defaults.

  Raises:
    UsageError: naming the unknown or malformed key, stage or option.
  """
  top = check_options(source, raw, TOP_LEVEL)
  stages_raw = top["stages"] or []
  kinds = stage_kinds()
  stages = []
  for index, entry in enumerate(stages_raw, start=1):
    if isinstance(entry, str):
      entry = {entry: None}
    if not isinstance(entry, Mapping) or len(entry) != 1:
      raise UsageError(
        f"Stage {index} in {source} must be a mapping with one stage kind, e.g. "
        "`- cast: {dtype: bfloat16}`."
      )
    ((kind, given),) = entry.items()
    if kind not in kinds:
      raise UsageError(
        f"Unknown stage `{kind}` (stage {index}) in {source}; valid stages: "
        f"{', '.join(sorted(kinds))}." + suggest(str(kind), sorted(kinds))
      )
    options = check_options(
      f"stage {index} (`{kind}`) of {source}", given, kinds[kind].options, what="option"
    )
    stages.append((kind, options))
  export = check_options(f"`export` of {source}", top["export"], EXPORT_OPTIONS, what="option")
  if export["serving"] not in (None, "auto"):
    from jaxshrink.serving import check_mode

    check_mode(
      export["serving"], where=f"`export.serving` of {source}",
      fix="Or use `auto` (time every mode, keep the fastest) or null (time nothing).",
    )  # fmt: skip
  for key in ("model", "params", "data"):
    if top[key] is not None and not isinstance(top[key], str):
      raise UsageError(f"`{key}` in {source} must be a string; got {top[key]!r}.")
  if top["metric"] is not None and not isinstance(top["metric"], (str, Mapping)):
    raise UsageError(
      f"`metric` in {source} must be a string or {{fn: ..., higher_is_better: ...}}; got "
      f"{top['metric']!r}."
    )
  training = None
  if top["training"] is not None:
    from jaxshrink.models.base import TRAINING_DEFAULTS

    training = check_options(
      f"`training` of {source}", top["training"], {k: None for k in TRAINING_DEFAULTS},
      what="field",
    )  # fmt: skip
    training = {k: v for k, v in training.items() if v is not None}
    for key, value in training.items():
      kind = float if key == "learning_rate" else int
      if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise UsageError(f"`training.{key}` in {source} must be {kind.__name__}; got {value!r}.")
      if value <= 0:
        raise UsageError(f"`training.{key}` in {source} must be > 0; got {value!r}.")
  pad_id = top["pad_id"]
  if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0):
    raise UsageError(
      f"`pad_id` in {source} must be the padding token id, an int >= 0 (or null: no padding); "
      f"got {pad_id!r}."
    )
  return Recipe(
    model=top["model"],
    params=top["params"],
    data=top["data"],
    seed=top["seed"],
    stages=tuple(stages),
    export=export,
    name=top["name"],
    raw=dict(raw),
    metric=dict(top["metric"]) if isinstance(top["metric"], Mapping) else top["metric"],
    training=training,
    pad_id=pad_id,
  )


def load_recipe(path: str | Path) -> Recipe:
  """Reads a YAML recipe file and validates it."""
  import yaml

  path = Path(path)
  if not path.is_file():
    raise UsageError(f"Recipe file `{path}` does not exist.")
  try:
    raw = yaml.safe_load(path.read_text())
  except yaml.YAMLError as e:
    raise UsageError(f"Recipe `{path}` is not valid YAML: {str(e).splitlines()[0]}") from None
  return parse_recipe(raw, source=f"`{path}`")


@dataclasses.dataclass(frozen=True)
class CompressResult:
  recipe: Recipe
  pipeline: Pipeline
  report: TreeReport
  metrics: dict[str, Any]


def load_float_params(model: Any, source: str | None, *, progress: bool = True) -> Any:
  """The recipe's float params: the zoo's trained ones, or a checkpoint dir."""
  from jaxshrink import export, models

  if source is None:
    return models.pretrained(model, progress=progress)
  path = Path(source)
  if (path / export.MANIFEST).is_file():
    return export.load(path, dense=True)
  if not path.is_dir():
    raise JaxshrinkError(f"`params: {source}` is not a directory; give a checkpoint dir or null.")
  import orbax.checkpoint as ocp

  target = jax.eval_shape(model.init, jax.random.key(0))
  try:
    return ocp.StandardCheckpointer().restore(path.absolute(), target)
  except Exception as e:  # orbax raises many types for a mismatched tree
    raise JaxshrinkError(
      f"Cannot restore `params: {source}` for model `{model.name}` ({type(e).__name__}). "
      "It must hold the model's float param tree."
    ) from None


def prepare(recipe: Recipe, *, progress: bool = True) -> Pipeline:
  """Loads the model, data and float params a recipe names."""
  from jaxshrink import data
  from jaxshrink.models.registry import default_metric, load_metric, load_model, with_metric

  model = load_model(recipe.model, training=recipe.training)
  if recipe.training is not None and model.framework != "user":
    raise UsageError(
      f"`training` sets the training fields of your own model; {recipe.model!r} is a zoo "
      "model with its own (`train_steps`, `learning_rate`, `batch_size`). Remove `training`, "
      "or set a stage's own `steps` / `learning_rate` / `batch_size`."
    )
  if recipe.pad_id is not None:
    if model.framework != "user":
      raise UsageError(
        f"`pad_id` sets your own model's padding token id; {recipe.model!r} is a zoo model "
        f"with its own ({model.pad_id}). Remove `pad_id`."
      )
    model = dataclasses.replace(model, pad_id=recipe.pad_id)
  if not (recipe.data or model.data):
    raise UsageError(
      f"`data` is required for {recipe.model!r}: a .npz file, a directory of .npy files or "
      "'pkg.mod:factory', with `x_train`/`y_train` (calibration, training) and "
      "`x_test`/`y_test` (held out, evaluated)."
    )
  dataset = data.load_data_source(recipe.data or model.data)
  if recipe.metric is not None:
    model = with_metric(model, load_metric(recipe.metric))
  elif model.framework == "user":
    model = with_metric(model, {"metric": default_metric(dataset.kind)})
  params = load_float_params(model, recipe.params, progress=progress)
  return Pipeline(
    model=model,
    dataset=dataset,
    float_model=model,
    float_params=params,
    tree=params,
    key=jax.random.key(recipe.seed),
    model_source=recipe.model,
  )


def training_fields(kind: str, options: Mapping[str, Any]) -> tuple[str, ...]:
  """The model's training fields a stage with these options reads (empty: it does not train).

  A distill stage trains its student, a model with its own fields, so it reads none here.
  """
  if kind == "quantize" and options.get("method") == "qat":
    return ("batch_size",)
  if kind == "prune" and options.get("method") in ("gradual", "rigl", "set"):
    return ("batch_size",)
  if kind == "factorize" and options.get("finetune_steps") and not options.get("batch_size"):
    return ("batch_size",)
  return ()


def calibrates(kind: str, options: Mapping[str, Any]) -> bool:
  """True for a stage that reads the train split (to calibrate or to train)."""
  if training_fields(kind, options) or kind in ("distill", "search"):
    return True
  if kind == "quantize":
    return options.get("method") != "rtn" or options.get("activation_bits") is not None
  if kind == "prune":
    return options.get("method") in ("wanda", "sparsegpt") or options.get("criterion") in (
      "saliency",
      "wanda",
    )
  return kind == "factorize" and bool(options.get("finetune_steps"))


def check_stage_inputs(index: int, kind: str, options: Mapping[str, Any], pipeline: Pipeline):
  """Refuses a stage the model or data cannot feed, before it runs: a training field the
  user did not give, or calibration without a train split (the test split never stands in).
  """
  missing = [f for f in training_fields(kind, options) if f in pipeline.model.unset]
  if missing:
    raise UsageError(
      f"stage {index} (`{kind}`, method {options.get('method', 'finetune')!r}) trains, and "
      f"reads the model's `{missing[0]}`, which {pipeline.model.name!r} does not give. Add "
      f"`training: {{{missing[0]}: ...}}` to the recipe."
    )
  if calibrates(kind, options) and len(getattr(pipeline.dataset, "x_train", ())) == 0:
    raise UsageError(
      f"stage {index} (`{kind}`) calibrates or trains on the data's train split, and "
      f"{pipeline.dataset.name!r} has none. Give `x_train` (and `y_train`): the held-out "
      "test split is only evaluated on."
    )


def run_stages(recipe: Recipe, pipeline: Pipeline) -> Pipeline:
  stage_kinds()  # registers every built-in stage kind
  for index, (kind, options) in enumerate(recipe.stages, start=1):
    check_stage_inputs(index, kind, options, pipeline)
    pipeline = run_stage(pipeline, kind, options)
  return pipeline


def run_recipe(recipe: Recipe, *, progress: bool = True) -> CompressResult:
  """Runs every stage and measures the result against the float params."""
  start = time.perf_counter()
  pipeline = run_stages(recipe, prepare(recipe, progress=progress))
  report = tree_report(pipeline.tree)
  # The float model's own float32 bytes: a structured or distilled model has fewer params than
  # the model it came from, so its own float32 size is not the baseline.
  float_bytes = tree_report(pipeline.float_params).float32_bytes
  metrics: dict[str, Any] = {
    "metric": pipeline.model.metric,
    "higher_is_better": pipeline.model.higher_is_better,
    "size_bytes": report.total_bytes,
    "float32_bytes": report.float32_bytes,
    "ratio": round(report.ratio, 4),
    "float_model_bytes": float_bytes,
    "ratio_vs_float_model": round(float_bytes / max(report.total_bytes, 1), 4),
    "stages": list(pipeline.log),
  }
  if recipe.export["evaluate"]:
    measured = evaluate_metrics(pipeline.model, pipeline.tree, pipeline.dataset)
    metrics["value"] = measured.pop("value")
    metrics["reference_value"] = evaluate_tree(
      pipeline.float_model, pipeline.float_params, pipeline.dataset
    )
    metrics.update(measured)  # min_cosine, neighbour_agreement for embedding models
  if recipe.export["serving"] is not None:
    metrics["serving"] = time_serving(pipeline, recipe.export["serving"])
  metrics["seconds"] = round(time.perf_counter() - start, 3)
  return CompressResult(recipe=recipe, pipeline=pipeline, report=report, metrics=metrics)


def time_serving(pipeline: Pipeline, mode: str) -> dict[str, Any]:
  """Times the tree in `mode` (or every mode, `auto`) against the float model, side by side.

  The float baseline is the model the recipe started from (a distilled student is timed
  against its teacher). Returns `Timing.to_json` of the chosen (fastest) mode on a batch of
  `SERVING_BATCH` test inputs; with `auto`, also the fastest on one input, under `single`
  (`serving.recorded_mode` picks between them by batch size).
  """
  from jaxshrink import serving

  def timed(rows: int) -> serving.Timing:
    return serving.measure(
      pipeline.model.apply, pipeline.tree, pipeline.float_params,
      (timing_batch(pipeline.dataset, rows),), modes=None if mode == "auto" else (mode,),
      float_apply=pipeline.float_model.apply,
    )  # fmt: skip

  batch = timed(SERVING_BATCH)
  out = batch.to_json(batch.fastest())
  if mode == "auto":  # one request may run fastest in another mode than a batch
    single = timed(1)
    out["single"] = single.to_json(single.fastest())
  return out
