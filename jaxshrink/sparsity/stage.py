"""The `prune` recipe stage: a thin adapter over the public sparsity functions.

```yaml
stages:
  - prune: {target: ".*kernel", exclude: "conv1/kernel", sparsity: 0.9, method: gradual,
            steps: 600, schedule: {kind: polynomial, end: 360, frequency: 30}}
  - prune: {structure: "2:4", method: oneshot, exclude: "conv1/kernel"}
  - prune: {sparsity: 0.9, method: gradual, quantize_nonzeros: 8}
  - prune: {target: ".*attention/.*/kernel", structure: heads, sparsity: 0.5, method: oneshot,
            shrink: true}          # tiny-lm: 2 of 4 heads per block removed
```

Selected kernels under `keep_dense_below` weights (default 4096: digits-cnn's 288-weight first
conv and 1,280-weight classifier; no transformer kernel) stay dense, and the others prune more
so the selected kernels' total sparsity is the requested one. The stage's log entry (the
checkpoint manifest's `metrics.stages`) records under `pruned` the achieved sparsity, each
kernel's, and every kernel kept dense or left alone with the reason:
`"conv1/kernel": "kept dense (288 weights < keep_dense_below 4096)"`.

With `shrink: true` the pipeline's model becomes the smaller one and its `model_source`
records the new sizes (`"tiny-lm(head_dim=40, layer_heads=(2, 2, 2, 2))"`), so the saved
checkpoint names a model `jaxshrink eval` rebuilds.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxshrink import sequential
from jaxshrink.compose import decode_selected, encoded_masks, frozen_zeros, keep_masks, refuse
from jaxshrink.encoding import is_encoding, materialize
from jaxshrink.errors import UsageError
from jaxshrink.pipeline import (
  CALIBRATION_ROWS,
  RULE_OPTIONS,
  Pipeline,
  calibration_inputs,
  register_stage,
  rule_from_options,
)
from jaxshrink.quant.spec import QuantSpec
from jaxshrink.sparsity.allocation import DEFAULT_KEEP_DENSE_BELOW, Pruner
from jaxshrink.sparsity.dynamic import dynamic_sparse
from jaxshrink.sparsity.encodings import encode_sparse
from jaxshrink.sparsity.finetune import finetune, finetune_optimizer
from jaxshrink.sparsity.oneshot import (
  _layer_sparsities,
  _oneshot_prune_with_masks,
  _sparsegpt_with_masks,
)
from jaxshrink.sparsity.schedules import schedule_from_options
from jaxshrink.sparsity.shrink import model_heads, shrink
from jaxshrink.sparsity.structures import NM, Channel, Heads, parse_structure
from jaxshrink.sparsity.wanda import _wanda_with_masks
from jaxshrink.sparsity.wrapper import masks_of, pruning
from jaxshrink.tree import flatten, map_with_path, paths_rule

METHODS = ("gradual", "oneshot", "rigl", "set", "wanda", "sparsegpt")

PRUNE_OPTIONS: dict[str, Any] = {
  **RULE_OPTIONS,
  "target": ".*kernel",
  "min_ndim": 2,
  "sparsity": 0.5,
  "structure": "unstructured",
  "criterion": "magnitude",
  "allocation": "uniform",
  "overrides": {},
  "keep_dense_below": DEFAULT_KEEP_DENSE_BELOW,
  "method": "gradual",
  "steps": 600,
  "learning_rate": 1e-3,
  "schedule": {},
  "drop_fraction": 0.3,
  "calibration_batches": 4,
  "calibration_data": "train",
  "num_heads": None,
  "head_size": None,
  "shrink": False,
  "encode": True,
  "quantize_nonzeros": None,
  "sequential": True,  # wanda / sparsegpt: block by block on the pruned model's outputs
  "weight_bits": None,  # sparsegpt: quantize in the same sweep (joint sparse + intN)
  "group_size": None,
  "symmetric": True,
}


def _saliency_grads(model: Any, params: Any, dataset: Any) -> Any:
  from jaxshrink.models import task_loss

  x, y = dataset.x_train[:256], dataset.y_train[:256]
  return jax.grad(lambda p: task_loss(model.apply(p, x), y))(params)


def _structure(options: dict[str, Any], model: Any):
  heads = {k: options[k] for k in ("num_heads", "head_size") if options[k] is not None}
  if options["structure"] == "heads" and not heads:
    heads = model_heads(model)  # e.g. tiny-lm's num_heads=4, BERT config's num_heads=12
  return parse_structure(options["structure"], **heads)


def _check_shrinkable(structure: Any, options: dict[str, Any]) -> None:
  # Checked before pruning, so a bad recipe fails before any fine-tuning runs.
  if not isinstance(structure, Heads) and (
    not isinstance(structure, Channel) or structure.axis != -1
  ):
    raise UsageError(
      f"`shrink: true` needs structure 'channel' (whole output channels) or 'heads'; got "
      f"{options['structure']!r}. Set one of those, or shrink: false."
    )


def _shrunk(pipeline: Pipeline, model: Any, params: Any, masks: Any, structure: Any):
  """The smaller model and params, with the model source recording the new sizes."""
  from jaxshrink.models.configured import configure_model, model_source

  params, config = shrink(model, params, masks, structure=structure)
  source = model_source(pipeline.model_source or model.name, config)
  return configure_model(model, config), params, source


# What `prune` cannot follow (`compose`): the orders that work are in the fixes.
REFUSALS = {
  "qarray": (
    "pruning moves weights off the grid the codes were fit to",
    "Prune first, then quantize: GPTQ, AWQ, RTN and W8A8 keep pruned weights exactly zero.",
  ),
  "lowrank": (
    "a factorized kernel's weights are the dense product of its factors, which pruning "
    "cannot keep sparse",
    "Prune some kernels and factorize others (exclude each stage's kernels from the other's "
    "`target`).",
  ),
}


def _joint_spec(options: dict[str, Any]) -> QuantSpec | None:
  """The grid sparsegpt quantizes the kept weights onto in the same sweep, or None."""
  keys = ("weight_bits", "group_size", "symmetric")
  if options["weight_bits"] is None:
    extra = [k for k in keys[1:] if options[k] != PRUNE_OPTIONS[k]]
    if extra:
      raise UsageError(
        f"`{extra[0]}` of `prune` sets the grid of joint sparse + quantized weights, which "
        "needs `weight_bits` (e.g. 4) and method `sparsegpt`. Add `weight_bits`, or remove it."
      )
    return None
  if options["method"] != "sparsegpt" or options["shrink"] or options["quantize_nonzeros"]:
    raise UsageError(
      f"`weight_bits: {options['weight_bits']}` of `prune` quantizes the kept weights in "
      "SparseGPT's own sweep, so it needs `method: sparsegpt` without `shrink` or "
      f"`quantize_nonzeros`; got method {options['method']!r}. Use sparsegpt, or a `quantize` "
      "stage after this one (it keeps the pruned zeros)."
    )
  spec = QuantSpec(
    bits=options["weight_bits"], group_size=options["group_size"], symmetric=options["symmetric"]
  )
  try:
    spec.validate("prune")
  except (TypeError, ValueError) as err:
    raise UsageError(f"`weight_bits`/`group_size` of `prune`: {err}") from None
  return spec


def _in_blocks(fn, apply_fn, params, batches, pruner: Pruner):
  """Sequential calibration (`jaxshrink.sequential`): each block is pruned by `fn` on the
  outputs of the blocks pruned before it, at the sparsity the whole-model allocation gave it,
  toward the float model's outputs (SparseGPT moves each kernel toward them first, Wanda
  picks the mask closest to them)."""
  paths, sparsities = _layer_sparsities(pruner, params)
  nm = isinstance(pruner.structure, NM)
  masks = None
  toward = {"reference": params}  # the stage's input model
  for block in sequential.blocks(apply_fn, params, batches[0], paths):
    part = Pruner(
      paths_rule(block),
      structure=pruner.structure,
      overrides=() if nm else [(re.escape(p), sparsities[p]) for p in block],
      keep_dense_below=0,
    )
    params, block_masks = fn(apply_fn, params, batches, part, **toward)
    masks = block_masks if masks is None else jax.tree.map(jnp.logical_and, masks, block_masks)
  return params, masks


def prune_stage(pipeline: Pipeline, options: dict[str, Any]) -> Pipeline:
  """Runs one pruning method on the pipeline's tree (and model, when shrinking)."""
  method = options["method"]
  if method not in METHODS:
    raise UsageError(f"Unknown prune `method` {method!r}; expected one of {list(METHODS)}.")
  if options["calibration_data"] != "train" and method not in ("wanda", "sparsegpt"):
    raise UsageError(
      f"`calibration_data` of stage `prune` is read by methods wanda and sparsegpt; method "
      f"{method!r} reads no calibration data. Remove `calibration_data`."
    )
  structure = _structure(options, pipeline.model)
  joint = _joint_spec(options)
  if options["shrink"]:
    _check_shrinkable(structure, options)
  pruner = Pruner(
    rule_from_options(options),
    sparsity=options["sparsity"],
    structure=structure,
    criterion=options["criterion"],
    allocation=options["allocation"],
    overrides=options["overrides"] or {},
    keep_dense_below=options["keep_dense_below"],
  )
  # A kernel pruned by an earlier stage is pruned again from its decoded values, and keeps
  # its old mask: the result is pruned where either mask prunes.
  earlier = encoded_masks(pipeline.tree, pruner.rule)
  params = decode_selected(
    pipeline.tree, pruner.rule, stage="prune", decode=("bitmask", "nm", "cast"),
    refusals=REFUSALS,
  )  # fmt: skip
  if joint is not None and earlier:
    path = next(iter(earlier))
    raise refuse(
      "prune", path, flatten(pipeline.tree)[path],
      "joint sparse + quantized SparseGPT fits its grid to one mask it chooses itself",
      "Run the joint stage on the float kernels, or drop `weight_bits` and add a `quantize` "
      "stage after this one (it keeps both masks' zeros).",
    )  # fmt: skip
  model, dataset = pipeline.model, pipeline.dataset
  key, stage_key = jax.random.split(pipeline.key)
  steps = options["steps"]
  if method in ("gradual", "rigl", "set"):
    inner = finetune_optimizer(options["learning_rate"], steps)
    if method == "gradual":
      schedule = schedule_from_options(options["schedule"], steps=steps)
      tx = pruning(inner, pruner, schedule)
    else:
      sched = options["schedule"] or {}
      schedule = schedule_from_options(
        {"kind": "constant", "end": int(0.75 * steps), "frequency": max(1, steps // 20), **sched},
        steps=steps,
      )
      tx = dynamic_sparse(
        method, inner, pruner, params, schedule, drop_fraction=options["drop_fraction"]
      )
    tx = optax.chain(tx, frozen_zeros(earlier))  # an earlier stage's zeros never regrow
    params, state = finetune(model, params, dataset, tx, steps=steps, key=stage_key)
    masks = masks_of(state)
  elif method == "oneshot":
    grads = _saliency_grads(model, params, dataset) if pruner.criterion == "saliency" else None
    # The masks applied, exactly (not read back off the zeros): the report counts them.
    params, masks = _oneshot_prune_with_masks(params, pruner, grads=grads, key=stage_key)
  else:
    batches = calibration_inputs(
      pipeline, options["calibration_data"], options["calibration_batches"], CALIBRATION_ROWS,
      "prune",
    )  # fmt: skip
    fn = (
      _wanda_with_masks
      if method == "wanda"
      else functools.partial(_sparsegpt_with_masks, quant=joint)
    )
    if options["sequential"]:
      params, masks = _in_blocks(fn, model.apply, params, batches, pruner)
    else:
      params, masks = fn(model.apply, params, batches, pruner)
  if joint is not None:  # QArray leaves whose codes are zero where pruned
    report = pruner.report(materialize(params), masks)
    found = {"pruned": report}
    return dataclasses.replace(pipeline, tree=params, key=key, log=(*pipeline.log, found))
  if earlier:
    masks = map_with_path(lambda p, m: m & earlier[p] if p in earlier else m, masks)
    params = keep_masks(params, earlier)
  report = pruner.report(params, masks)
  source = pipeline.model_source
  if options["shrink"]:
    model, params, source = _shrunk(pipeline, model, params, masks, structure)
  elif options["encode"]:
    params = encode_sparse(
      params,
      pruner.pruned_rule,  # kernels kept dense stay plain arrays
      structure=structure if isinstance(structure, NM) else None,
      masks=masks,
      quantize_nonzeros=options["quantize_nonzeros"],
    )
  params = jax.tree.map(
    lambda a: a if is_encoding(a) else jnp.asarray(a), params, is_leaf=is_encoding
  )
  # The stage's findings; `run_stages` merges them into the stage's one log entry.
  found = {"pruned": report}
  return dataclasses.replace(
    pipeline, model=model, tree=params, key=key, model_source=source, log=(*pipeline.log, found)
  )


register_stage(
  "prune",
  options=PRUNE_OPTIONS,
  doc=(
    "Prune selected kernels (gradual, oneshot, rigl, set, wanda, sparsegpt; unstructured, N:M, "
    "block, channel, heads) and store them as bitmask / N:M encodings, or shrink channels and "
    "heads into a smaller model."
  ),
)(prune_stage)
