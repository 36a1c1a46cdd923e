"""The `structured` recipe stage: Minitron-style width and depth pruning of a BERT encoder or
a Llama decoder.

```yaml
stages:
  - structured: {params: 0.67, heads: true, channels: true, layers: 0, refit: true,
                 ranking: auto}
  - recover: {steps: 300, data: corpus}
```

Importance comes from the training split (`calibration_batches` batches of
`calibration_rows` sentences; never the test split), or with `calibration_data: corpus` from
the offline transfer corpus (MiniLM-tokenized models: more, and more varied, sentences than the
training split holds). The plan keeps `params` of the non-embedding params, and the model
becomes the smaller dense one (`jaxshrink.sparsity.minitron`). With `refit` (the default),
each kept layer's attention output and feed-forward output projections are then refitted by
least squares to the float layer's outputs on the same calibration batches
(`jaxshrink.sparsity.refit`).
`ranking` picks what goes: `refit` (what `auto` means with `refit: true`) ranks heads and
channels by the error the refit cannot undo (`jaxshrink.sparsity.refit_rank`; on MiniLM at
half the channels, 0.910 held-out cosine before recovery against 0.872), `activation` by the
Minitron activation norms (what `auto` means with `refit: false`). `widths: allocated` (BERT)
spreads the same channel count unevenly, fewer where the output embedding loses least
(`jaxshrink.sparsity.minitron_widths`); `uniform` keeps one width in every layer.
The new `model_source` records the new sizes
(`"minilm-l6(num_layers=6, head_dim=32, layer_heads=(8, ...), layer_intermediate=(1024, ...))"`),
so the saved checkpoint names a model `jaxshrink eval` rebuilds. The log entry records the
kept layers, heads and channel counts, and the params before and after. With `kept_layers` and
`layer_path` a later `recover` pairs each renumbered layer with the float layer it was cut from.

A Llama decoder (`jaxshrink.sparsity.minitron_llama`) calibrates on training windows and keeps
the same number of query heads in each kept key/value group, so grouped-query attention stays
valid and the result is a plain `LlamaConfig` (`"llama-tiny(num_layers=6, num_heads=8,
num_kv_heads=2, head_dim=32, intermediate_size=608)"`), which exports to Hugging Face as is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxshrink.encoding import is_encoding
from jaxshrink.errors import InvalidTypeError, InvalidValueError, UsageError
from jaxshrink.pipeline import (
  Pipeline,
  calibration_ids,
  check_calibration_data,
  check_positive,
  length_sorted_batches,
  register_stage,
)
from jaxshrink.sparsity.minitron import LAYER as BERT_LAYER
from jaxshrink.sparsity.minitron import (
  bert_config,
  encoder_param_count,
  importance,
  plan_pruning,
  shrink_bert,
)
from jaxshrink.sparsity.minitron_llama import LAYER as LLAMA_LAYER
from jaxshrink.sparsity.minitron_llama import (
  llama_config,
  llama_importance,
  llama_output_grams,
  param_counts,
  plan_llama,
  refit_llama,
  shrink_llama,
  training_windows,
)
from jaxshrink.sparsity.minitron_widths import allocated_plan
from jaxshrink.sparsity.refit import output_grams, refit_outputs
from jaxshrink.sparsity.refit_rank import refit_ranked, refit_ranked_llama

STRUCTURED_OPTIONS: dict[str, Any] = {
  "params": 0.67,
  "heads": True,
  "channels": True,
  "layers": 0,
  "refit": True,
  "ranking": "auto",
  "widths": "uniform",
  "calibration_batches": 4,
  "calibration_rows": 64,
  "calibration_data": "train",
}
STAGE = "stage `structured`"
RANKINGS = ("auto", "refit", "activation")
WIDTHS = ("uniform", "allocated")


def _ranking(options: dict[str, Any]) -> str:
  if options["ranking"] == "auto":
    return "refit" if options["refit"] else "activation"
  return options["ranking"]


def _check(options: dict[str, Any]) -> None:
  for key in ("heads", "channels", "refit"):
    if not isinstance(options[key], bool):
      raise UsageError(f"`{key}` of {STAGE} must be true or false; got {options[key]!r}.")
  for key in ("calibration_batches", "calibration_rows"):
    check_positive(options, key, "structured")
  if options["ranking"] not in RANKINGS:
    raise UsageError(
      f"`ranking` of {STAGE} must be one of {', '.join(map(repr, RANKINGS))}; got "
      f"{options['ranking']!r}. 'auto' ranks by the refit's error with `refit: true`."
    )
  if options["ranking"] == "refit" and not options["refit"]:
    raise UsageError(
      f"{STAGE}: `ranking: refit` ranks by the error left after the least-squares refit, and "
      "`refit: false` turns the refit off. Drop one of the two keys."
    )
  if options["widths"] not in WIDTHS:
    raise UsageError(
      f"`widths` of {STAGE} must be one of {', '.join(map(repr, WIDTHS))}; got "
      f"{options['widths']!r}."
    )
  if options["widths"] == "allocated" and (_ranking(options) != "refit" or not options["channels"]):
    raise UsageError(
      f"{STAGE}: `widths: allocated` spreads the feed-forward channels by the refit's error, so "
      "it needs `channels: true` and `ranking: refit` (or `auto` with `refit: true`); got "
      f"channels: {options['channels']}, ranking: {options['ranking']}, refit: "
      f"{options['refit']}."
    )
  check_calibration_data(options["calibration_data"], "structured")


@register_stage(
  "structured",
  options=STRUCTURED_OPTIONS,
  doc="Minitron-style structured pruning of a BERT encoder or a Llama decoder: rank heads (whole "
  "grouped-query groups for Llama), feed-forward channels and layers by activations on the "
  "training split, keep `params` of the non-embedding params, shrink to a smaller, faster dense "
  "model, and refit the output projections (`refit`).",
)
def structured_stage(pipeline: Pipeline, options: dict[str, Any]) -> Pipeline:
  from jaxshrink.models.configured import configure_model, model_source

  _check(options)
  model = pipeline.model
  if any(is_encoding(leaf) for leaf in jax.tree.leaves(pipeline.tree, is_leaf=is_encoding)):
    raise UsageError(
      f"{STAGE} slices float kernels, and an earlier stage left compressed ones. Put "
      "`structured` first, then prune, quantize or factorize the smaller model."
    )
  prune = _llama if _is_llama(model) else _bert
  params, overrides, found, scores = prune(pipeline, options)
  small = configure_model(model, overrides)
  source = model_source(pipeline.model_source or model.name, overrides)
  found |= {
    "layer_importance": [round(float(v), 5) for v in scores.layers],
    "refit": options["refit"],
  }
  return dataclasses.replace(
    pipeline, model=small, tree=params, model_source=source,
    log=(*pipeline.log, {"structured": found}),
  )  # fmt: skip


def _is_llama(model: Any) -> bool:
  try:
    llama_config(model)
  except InvalidTypeError:
    return False
  return True


def _plan(planner, scores, config, options):
  try:
    return planner(
      scores, config, params=options["params"], heads=options["heads"],
      channels=options["channels"], layers=options["layers"],
    )  # fmt: skip
  except InvalidValueError as e:
    raise UsageError(f"{STAGE}: {e}") from None


def _bert(pipeline: Pipeline, options: dict[str, Any]):
  model = pipeline.model
  try:
    config = bert_config(model)
  except InvalidTypeError:
    raise UsageError(
      f"{STAGE} needs a BERT encoder (a `BertConfig`, e.g. 'minilm-l6') or a Llama decoder (a "
      f"`LlamaConfig`, e.g. 'llama-tiny'); model {model.name!r} is neither. Use `prune` with "
      "structure 'channel' or 'heads' for other models."
    ) from None
  ids = calibration_ids(pipeline, options["calibration_data"], "structured")
  batches = length_sorted_batches(
    ids, options["calibration_batches"], options["calibration_rows"], config.pad_id
  )
  scores = importance(model, pipeline.tree, batches)
  grams = None
  if _ranking(options) == "refit":
    grams = output_grams(model.apply, pipeline.tree, range(config.num_layers), config, batches)
    scores = refit_ranked(scores, pipeline.tree, grams, config)
  plan = _plan(plan_pruning, scores, config, options)
  if options["widths"] == "allocated":
    plan = allocated_plan(model, pipeline.tree, scores, plan, config, batches, grams)
  params, overrides = shrink_bert(pipeline.tree, plan, config)
  if options["refit"]:
    params = refit_outputs(model.apply, pipeline.tree, params, plan, config, batches, grams=grams)
  before = encoder_param_count(config)
  after = encoder_param_count(dataclasses.replace(config, **overrides))
  kind = "training" if options["calibration_data"] == "train" else "transfer-corpus"
  found = {
    "kept_layers": list(plan.layers),
    "layer_path": BERT_LAYER,
    "layer_heads": list(overrides["layer_heads"]),
    "layer_intermediate": list(overrides["layer_intermediate"]),
    "encoder_params": [before, after],
    "kept_fraction": round(after / before, 4),
    "calibration": f"{sum(len(b) for b in batches)} {kind} sentences",
    "ranking": _ranking(options),
    "widths": options["widths"],
  }
  return params, overrides, found, scores


def _llama(pipeline: Pipeline, options: dict[str, Any]):
  model, config = pipeline.model, llama_config(pipeline.model)
  if options["widths"] != "uniform":
    raise UsageError(
      f"{STAGE}: a Llama decoder keeps one width in every layer (one `LlamaConfig`, as Hugging "
      f"Face configs have), so `widths` must be 'uniform'; got {options['widths']!r}."
    )
  ids = calibration_ids(pipeline, options["calibration_data"], "structured")
  batches = training_windows(ids, options["calibration_batches"], options["calibration_rows"])
  scores = llama_importance(model, pipeline.tree, batches)
  grams = None
  if _ranking(options) == "refit":
    grams = llama_output_grams(model.apply, pipeline.tree, range(config.num_layers), batches)
    scores = refit_ranked_llama(scores, pipeline.tree, grams, config)
  plan = _plan(plan_llama, scores, config, options)
  params, overrides = shrink_llama(pipeline.tree, plan, config)
  if options["refit"]:
    params = refit_llama(model.apply, pipeline.tree, params, plan, config, batches, grams=grams)
  before, after = param_counts(config, overrides)
  found = {
    "kept_layers": list(plan.layers),
    "layer_path": LLAMA_LAYER.rstrip("/"),
    "kept_heads": [list(h) for h in plan.heads],
    **{k: overrides[k] for k in ("num_heads", "num_kv_heads", "intermediate_size")},
    "decoder_params": [before, after],
    "kept_fraction": round(after / before, 4),
    "calibration": f"{sum(len(b) for b in batches)} training windows",
    "ranking": _ranking(options),
  }
  return params, overrides, found, scores
