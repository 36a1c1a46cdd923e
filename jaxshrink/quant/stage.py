"""The `quantize` recipe stage: RTN, calibrated W8A8 PTQ, SmoothQuant, QAT, GPTQ, AWQ."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxshrink.errors import UsageError
from jaxshrink.quant.ptq import LayerQuant, ptq, quantize_params
from jaxshrink.quant.spec import QuantSpec
from jaxshrink.recipes import RULE_OPTIONS, Pipeline, register_stage, rule_from_options
from jaxshrink.tree import Rule

METHODS = ("rtn", "gptq", "awq", "smoothquant", "qat")
SPEC_KEYS = ("weight_bits", "activation_bits", "group_size", "symmetric", "format")
OPTIONS = {
  **RULE_OPTIONS,
  "target": ".*kernel",
  "min_ndim": 2,
  "weight_bits": 8,
  "activation_bits": None,
  "group_size": None,
  "symmetric": True,
  "format": "int",
  "method": "rtn",
  "calibration_batches": 8,
  "calibration": "absmax",
  "static_activations": True,
  "steps": 200,
  "learning_rate": 1e-4,
  "alpha": 0.5,
  "act_order": True,  # GPTQ: quantize inputs by decreasing Hessian diagonal (better on tiny-lm)
  "damp": 0.01,  # GPTQ: Hessian damping, as a fraction of its mean diagonal
  "grid": 20,  # AWQ: points of the scale-exponent search
  "overrides": [],
}


def _layer(settings: dict[str, Any], where: str) -> LayerQuant:
  spec = QuantSpec(
    bits=settings["weight_bits"],
    symmetric=settings["symmetric"],
    group_size=settings["group_size"],
    format=settings["format"],
  )
  spec.validate(where)
  return LayerQuant(spec, settings["activation_bits"])


def _overrides(options: dict[str, Any]) -> list:
  out = []
  for i, entry in enumerate(options["overrides"]):
    if not isinstance(entry, dict) or "target" not in entry:
      raise UsageError(f"`overrides[{i}]` of `quantize` must be a mapping with a `target`.")
    unknown = set(entry) - {"target", "exclude", "skip", *SPEC_KEYS}
    if unknown:
      raise UsageError(
        f"Unknown key(s) {sorted(unknown)} in `overrides[{i}]` of `quantize`; valid: target, "
        f"exclude, skip, {', '.join(SPEC_KEYS)}."
      )
    rule = Rule(include=entry["target"], exclude=entry.get("exclude"))
    if entry.get("skip"):
      out.append((rule, None))
      continue
    merged = {k: entry.get(k, options[k]) for k in SPEC_KEYS}
    out.append((rule, _layer(merged, f"overrides[{i}]")))
  return out


def calibration_batches(pipeline: Pipeline, count: int) -> list:
  """`count` training batches of the model's batch size (first ones, deterministic)."""
  if count < 1:
    raise UsageError(f"`calibration_batches` must be >= 1; got {count}.")
  x = np.asarray(pipeline.dataset.x_train)
  size = pipeline.model.batch_size
  return [x[i * size : (i + 1) * size] for i in range(count) if i * size < len(x)]


@register_stage(
  "quantize",
  options=OPTIONS,
  doc="Quantize kernels: int8/4/3/2 or fp8 weights, optional int8 activations (W8A8); "
  "methods rtn, gptq, awq, smoothquant, qat.",
)
def quantize_stage(pipeline: Pipeline, options: dict[str, Any]) -> Pipeline:
  method = options["method"]
  if method not in METHODS:
    raise UsageError(f"`method` of `quantize` must be one of {list(METHODS)}; got {method!r}.")
  rule = rule_from_options(options)
  layer = _layer(options, "quantize")
  overrides = _overrides(options)
  model, tree = pipeline.model, pipeline.tree
  if (
    method == "rtn"
    and options["activation_bits"] is None
    and not any(o and o.activation_bits for _, o in overrides)
  ):
    tree = quantize_params(tree, rule, layer, overrides=overrides)
    return dataclasses.replace(pipeline, tree=tree)
  batches = calibration_batches(pipeline, options["calibration_batches"])
  if method in ("rtn", "smoothquant"):
    tree = ptq(
      model.apply, tree, batches, rule, layer, calibration=options["calibration"],
      static_activations=options["static_activations"], overrides=overrides,
      smooth_alpha=options["alpha"] if method == "smoothquant" else None,
    )  # fmt: skip
  elif method == "qat":
    from jaxshrink.quant.qat import convert, qat_finetune

    ds = pipeline.dataset
    trained = qat_finetune(
      model.apply, tree, ds.x_train, ds.y_train, rule, layer, steps=options["steps"],
      learning_rate=options["learning_rate"], batch_size=model.batch_size, overrides=overrides,
    ).params  # fmt: skip
    if layer.activation_bits is None:
      tree = convert(trained, rule, layer, overrides=overrides)
    else:
      tree = ptq(model.apply, trained, batches, rule, layer, overrides=overrides)
  elif method == "gptq":
    from jaxshrink.quant.gptq import gptq

    tree = gptq(
      model.apply,
      tree,
      batches,
      rule,
      layer.spec,
      damp=options["damp"],
      act_order=options["act_order"],
    )
  else:
    from jaxshrink.quant.awq import awq

    tree = awq(model.apply, tree, batches, rule, layer.spec, grid=options["grid"])
  return dataclasses.replace(pipeline, tree=tree)
