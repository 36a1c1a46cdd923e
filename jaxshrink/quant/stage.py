"""The `quantize` recipe stage: RTN, calibrated W8A8 PTQ, SmoothQuant, QAT, GPTQ, AWQ.

Every key is read by some method, and no key is accepted and then ignored: a key the chosen
method does not read, set to anything but its default, is a `UsageError` naming the key, the
method and the fix (`grid` with gptq, `alpha` with rtn, `calibration` on a weight-only run, ...).
`overrides` is an ordered, first-match list: the first entry whose `target` matches a kernel
decides its settings (put the specific entries before the broad ones); an entry that selects
nothing, because its `target` matches no kernel or only kernels an earlier entry took, is an
error. Each entry's rule takes the stage's `min_ndim` and `min_size`.
`overrides` and W8A8 activations (`activation_bits`, `calibration`, `static_activations`) work
with every method: GPTQ and AWQ quantize the weights, then each kernel whose layer has
activation bits gets the activation scales that `ptq` would give it. Activation scales are
dynamic, one per token computed at run time, unless `static_activations: true` stores one
calibrated per-tensor scale per kernel (clipped by `calibration`). On all-MiniLM-L6-v2 the
shortest W8A8 recipe keeps mean cosine 0.997 on held-out sentences with dynamic scales, 0.983
with static absmax ones.

`embeddings: {bits: 8}` (or `{bits: 4, group_size: 32}`; off by default) also quantizes every
table the model reads by gather, found by tracing its apply (word, position and token-type
embeddings), one scale per row, or per `group_size` elements of a row (`ptq.quantize_tables`);
`embeddings.overrides: [{target: ".*position.*", bits: 8}]` sets other bits for some tables
(first match wins, as in `overrides`).
Serving decodes only the gathered rows; a tied output head uses the same stored codes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax

from jaxshrink import sequential
from jaxshrink.capture import find_sites
from jaxshrink.compose import (
  check_zeros_kept,
  decode_selected,
  encoded_masks,
  frozen_zeros,
  selected_encodings,
  without,
)
from jaxshrink.encoding import materialize
from jaxshrink.errors import UsageError
from jaxshrink.lowrank.encoding import LowRank
from jaxshrink.pipeline import (
  RULE_OPTIONS,
  Pipeline,
  calibration_inputs,
  register_stage,
  rule_from_options,
)
from jaxshrink.quant.calibrate import calibrate, check_method
from jaxshrink.quant.factors import gptq_factors, rtn_factors
from jaxshrink.quant.ptq import (
  LayerQuant,
  ptq,
  quantize_params,
  resolve_layers,
  static_activation_scale,
)
from jaxshrink.quant.spec import QuantSpec
from jaxshrink.quant.stage_tables import embedding_tables, with_tables
from jaxshrink.tree import Rule, flatten, map_with_path, paths_rule

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
  "calibration_data": "train",
  "calibration": "absmax",
  "static_activations": False,  # dynamic per-token scales; true = calibrated per tensor
  "steps": 200,
  "learning_rate": 1e-4,
  "alpha": 0.5,
  "act_order": True,  # GPTQ: quantize inputs by decreasing Hessian diagonal (better on tiny-lm)
  "damp": 0.01,  # GPTQ: Hessian damping, as a fraction of its mean diagonal
  "grid": 20,  # AWQ: points of the scale-exponent search
  "sequential": True,  # GPTQ/AWQ: block by block, on the outputs of the quantized blocks
  "overrides": [],
  "embeddings": None,  # e.g. {bits: 8}: gathered tables (word/position/token-type), per row
}
# Keys only some methods read, and what they mean (for the refusal's message).
METHOD_KEYS = {
  "steps": (("qat",), "QAT fine-tuning steps"),
  "learning_rate": (("qat",), "the QAT learning rate"),
  "alpha": (("smoothquant",), "SmoothQuant's migration strength"),
  "act_order": (("gptq",), "GPTQ's input order"),
  "damp": (("gptq",), "GPTQ's Hessian damping"),
  "grid": (("awq",), "AWQ's scale-exponent search"),
  "sequential": (("gptq", "awq"), "block-by-block calibration"),
}
CALIBRATION_NEEDS_STATIC = (
  "`calibration: {!r}` of `quantize` chooses the clip of static activation scales, so it needs "
  "`static_activations: true`; got `static_activations: false` (the default: dynamic scales, "
  "one per token, computed at run time). Set `static_activations: true`, or remove "
  "`calibration`."
)
# Methods that calibrate even weight-only (Hessians, activation magnitudes, channel maxima).
CALIBRATED = ("gptq", "awq", "smoothquant")


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
    skip = entry.get("skip", False)
    if not isinstance(skip, bool):
      raise UsageError(f"`overrides[{i}].skip` of `quantize` must be true or false; got {skip!r}.")
    rule = Rule(
      include=entry["target"],
      exclude=entry.get("exclude"),
      min_ndim=options["min_ndim"],
      min_size=options["min_size"],
    )
    if skip:
      ignored = sorted(set(entry) & set(SPEC_KEYS))
      if ignored:
        raise UsageError(
          f"`overrides[{i}]` of `quantize` has `skip: true`, which keeps its layers float, and "
          f"also sets {', '.join(ignored)}; remove those keys or the `skip`."
        )
      out.append((rule, None))
      continue
    merged = {k: entry.get(k, options[k]) for k in SPEC_KEYS}
    out.append((rule, _layer(merged, f"overrides[{i}]")))
  return out


def _check_keys(options: dict[str, Any], layers: dict[str, LayerQuant]) -> None:
  """Refuses every key the method would not read (set away from its default)."""
  method = options["method"]

  def refuse(key: str, why: str, fix: str) -> None:
    raise UsageError(
      f"`{key}: {options[key]!r}` of `quantize` does not apply to method `{method}`: {why}. {fix}"
    )

  for key, (methods, meaning) in METHOD_KEYS.items():
    if method not in methods and options[key] != OPTIONS[key]:
      refuse(key, f"it sets {meaning}", f"Remove `{key}`, or use method `{methods[0]}`.")
  if method in ("gptq", "awq"):
    for i, entry in enumerate(options["overrides"]):
      if entry.get("format", "int") != "int":
        raise UsageError(
          f"`overrides[{i}].format: {entry['format']!r}` of `quantize`: method `{method}` "
          "produces integer codes. Use format `int`, or method `rtn` for fp8."
        )
    if options["format"] != "int":
      refuse("format", f"{method} produces integer codes", "Use format `int`, or method `rtn`.")
  if any(layer.activation_bits for layer in layers.values()):
    if not options["static_activations"] and options["calibration"] != OPTIONS["calibration"]:
      raise UsageError(CALIBRATION_NEEDS_STATIC.format(options["calibration"]))
    return
  if method == "smoothquant":
    raise UsageError(
      "Method `smoothquant` of `quantize` migrates activation outliers into the weights for "
      "W8A8, but no layer has `activation_bits`. Set `activation_bits: 8`, or use method `rtn` "
      "for weight-only quantization."
    )
  fix = "Set `activation_bits: 8` for W8A8, or remove `{}`."
  for key in ("calibration", "static_activations"):
    if options[key] != OPTIONS[key]:
      refuse(key, "it sets how activations are quantized and no layer has `activation_bits`",
             fix.format(key))  # fmt: skip
  for key in ("calibration_batches", "calibration_data"):
    if method not in CALIBRATED and options[key] != OPTIONS[key]:
      refuse(key, f"weight-only {method} reads no calibration data", fix.format(key))


def calibration_batches(pipeline: Pipeline, options: dict[str, Any]) -> list:
  """The stage's calibration batches, of the model's batch size (`calibration_inputs`)."""
  return calibration_inputs(
    pipeline, options["calibration_data"], options["calibration_batches"],
    pipeline.model.batch_size, "quantize",
  )  # fmt: skip


def with_activations(
  apply_fn: Any,
  params: Any,
  ctree: Any,
  batches: list,
  layers: dict[str, LayerQuant],
  *,
  calibration: str = "absmax",
  static_activations: bool = False,
) -> Any:
  """Adds activation quantization to the `QArray`s of `ctree` whose layer has activation bits.

  The activation scales are the ones `ptq` gives round-to-nearest kernels: dynamic per-token
  scales by default, or with `static_activations` one scale per kernel, `calibrate` on the
  float `params` with the same clipping method, `scale = clip / (2^(bits-1) - 1)`. A kernel
  with an `input_scale` (AWQ) meets `x / input_scale`, so that is what its clip is calibrated
  on.
  """
  bits = {path: layer.activation_bits for path, layer in layers.items() if layer.activation_bits}
  if not bits:
    return ctree
  flat = flatten(ctree)
  stats = {}
  if static_activations:
    input_scales = {
      p: np.asarray(flat[p].input_scale) for p in bits if flat[p].input_scale is not None
    }
    stats = calibrate(
      apply_fn, params, batches, paths_rule(bits), method=calibration, input_scales=input_scales
    )

  def visit(path: str, leaf: Any) -> Any:
    if path not in bits:
      return leaf
    act_scale = None
    if path in stats:
      act_scale = static_activation_scale(stats[path].clip, bits[path])
    return dataclasses.replace(leaf, act_bits=int(bits[path]), act_scale=act_scale)

  return map_with_path(visit, ctree)


def _stacked_sites(pipeline: Pipeline, tree: Any, rule: Any) -> dict[str, Any] | None:
  """The sites of kernels stacked by `nn.scan` / `nnx.scan`, from one abstract trace of the
  model, so weight-only quantization gives each layer its own scales; None when none is."""
  ds = pipeline.dataset
  x = ds.x_train if getattr(ds, "x_train", None) is not None else ds.x_test
  # Only shapes are read (an abstract trace), so any split serves.
  # Shapes of the decoded tree: an earlier stage's encodings (masks, factors) count as the
  # kernels they stand for, and nothing is decoded.
  shapes = jax.eval_shape(materialize, tree)
  sites = find_sites(pipeline.model.apply, shapes, np.asarray(x[:1]), rule=rule)
  return {path: site for path, site in sites.items() if site.layers} or None


@register_stage(
  "quantize",
  options=OPTIONS,
  doc="Quantize kernels: int8/4/3/2 or fp8 weights, optional int8 activations (W8A8); "
  "methods rtn, gptq, awq, smoothquant, qat; `embeddings: {bits, group_size}` quantizes the "
  "tables the model gathers from, per row.",
)
def quantize_stage(pipeline: Pipeline, options: dict[str, Any]) -> Pipeline:
  method = options["method"]
  if method not in METHODS:
    raise UsageError(f"`method` of `quantize` must be one of {list(METHODS)}; got {method!r}.")
  rule = rule_from_options(options)
  layer = _layer(options, "quantize")
  overrides = _overrides(options)
  tree = pipeline.tree
  layers = resolve_layers(tree, rule, layer, overrides)
  check_method(options["calibration"], "calibration")  # before GPTQ/AWQ/QAT spend any time
  _check_keys(options, layers)
  activations = any(q.activation_bits for q in layers.values())
  tables = embedding_tables(pipeline, options, layers)
  masks = encoded_masks(tree, rule)
  tree = _decoded(tree, rule, method, activations)
  factored = [p for p, leaf in selected_encodings(tree, rule).items() if isinstance(leaf, LowRank)]
  dense_rule = without(rule, factored)
  if not any(dense_rule.matches(p, leaf) for p, leaf in flatten(tree).items()):
    pass  # every selected kernel is factorized: only the factors are quantized
  elif method == "rtn" and not activations:
    sites = _stacked_sites(pipeline, tree, dense_rule)
    tree = quantize_params(tree, dense_rule, layer, overrides=overrides, contract_dims=sites)
  else:
    tree = _calibrated(pipeline, options, tree, dense_rule, layer, layers, overrides, masks)
  tree = _factors(pipeline, options, tree, {p: layers[p].spec for p in factored})
  check_zeros_kept(masks, tree)
  return dataclasses.replace(pipeline, tree=with_tables(tree, tables))


def _decoded(tree: Any, rule: Rule, method: str, activations: bool) -> Any:
  """The tree with the selected kernels an earlier stage pruned or cast decoded (zeros kept);
  factorized kernels stay for `_factors`; what cannot compose is refused naming both stages."""
  refusals = {
    "qarray": (
      "its codes are already on a grid, and a second rounding compounds the error",
      "Quantize each kernel once: exclude it from this stage's `target`, or set the earlier "
      "stage's bits (its `overrides`).",
    )
  }
  weight_only = method in ("rtn", "gptq") and not activations
  if not weight_only:
    what = {
      "qat": "QAT trains dense kernels, not factors",
      "awq": "AWQ scales a kernel's input channels, and the second factor's inputs are the rank "
      "activations between the factors, which no scale is fitted to",
    }.get(
      method,
      "activation quantization quantizes a kernel's input, and the rank activations between "
      "the two factors have no quantizer (calibrated or per token)",
    )
    refusals["lowrank"] = (
      what,
      "Quantize factorized kernels weight-only (`method: rtn` or `gptq`, no `activation_bits`),"
      " or exclude them from `target`.",
    )
  return decode_selected(
    tree, rule, stage="quantize", decode=("bitmask", "nm", "cast"), refusals=refusals,
    keep=("lowrank",) if weight_only else (),
  )  # fmt: skip


def _calibrated(pipeline, options, tree, rule, layer, layers, overrides, masks) -> Any:
  """Calibrated PTQ (W8A8, SmoothQuant), QAT, GPTQ or AWQ on the selected dense kernels."""
  method, model = options["method"], pipeline.model
  batches = calibration_batches(pipeline, options)
  act_options = {
    "calibration": options["calibration"],
    "static_activations": options["static_activations"],
  }
  activations = any(q.activation_bits for q in layers.values())
  if method in ("rtn", "smoothquant"):
    return ptq(
      model.apply, tree, batches, rule, layer, overrides=overrides,
      smooth_alpha=options["alpha"] if method == "smoothquant" else None, **act_options,
    )  # fmt: skip
  if method == "qat":
    from jaxshrink.quant.qat import qat_finetune

    ds = pipeline.dataset
    # Pruned kernels stay pruned: their weights start at zero and get no update.
    optimizer = optax.chain(optax.adam(options["learning_rate"]), frozen_zeros(masks))
    trained = qat_finetune(
      model.apply, tree, ds.x_train, ds.y_train, rule, layer, steps=options["steps"],
      batch_size=model.batch_size, overrides=overrides, optimizer=optimizer,
    ).params  # fmt: skip
    if activations:
      return ptq(model.apply, trained, batches, rule, layer, overrides=overrides, **act_options)
    sites = _stacked_sites(pipeline, trained, rule)
    return quantize_params(trained, rule, layer, overrides=overrides, contract_dims=sites)
  # GPTQ/AWQ quantize weights; the layers' activation bits are added on top.
  if method == "gptq":
    from jaxshrink.quant.gptq import gptq

    def fit(t, r, spec, overrides=(), reference=None):
      return gptq(
        model.apply, t, batches, r, spec, damp=options["damp"], act_order=options["act_order"],
        overrides=overrides, reference=reference,
      )  # fmt: skip
  else:
    from jaxshrink.quant.awq import awq

    def fit(t, r, spec, overrides=(), reference=None):
      return awq(
        model.apply, t, batches, r, spec, grid=options["grid"], overrides=overrides,
        reference=reference,
      )  # fmt: skip

  if options["sequential"]:
    flat = flatten(tree)
    specs = {p: layers[p].spec for p in flat if p in layers and rule.matches(p, flat[p])}
    quantized = _in_blocks(fit, model.apply, tree, batches[0], specs)
  else:
    weight_overrides = [(r, None if o is None else o.spec) for r, o in overrides]
    quantized = fit(tree, rule, layer.spec, weight_overrides)
  return with_activations(model.apply, tree, quantized, batches, layers, **act_options)


def _in_blocks(fit, apply_fn, tree: Any, x: Any, specs: dict[str, QuantSpec]) -> Any:
  """Sequential calibration (`jaxshrink.sequential`): `fit` quantizes one block at a time, on
  the outputs of the blocks quantized before it (one call per spec in a block), each kernel
  moved toward the float model's outputs first."""

  reference = tree  # each block is moved toward the stage's input model (`sequential`)
  for block in sequential.blocks(apply_fn, tree, x, specs):
    by_spec: dict[QuantSpec, list[str]] = {}
    for path in block:
      by_spec.setdefault(specs[path], []).append(path)
    for spec, paths in by_spec.items():
      tree = fit(tree, paths_rule(paths), spec, reference=reference)
  return tree


def _factors(pipeline: Pipeline, options: dict[str, Any], tree: Any, specs: dict) -> Any:
  """Quantizes the factors of the selected factorized kernels (`quant.factors`)."""
  if not specs:
    return tree
  flat = flatten(tree)
  if options["method"] == "rtn":
    new = {p: rtn_factors(p, flat[p], spec) for p, spec in specs.items()}
  else:
    from jaxshrink.hessian import collect_hessians

    # One collection for every factorized kernel, on the tree as it is now (the other kernels
    # already quantized), each factorized kernel decoded as the dense kernel it stands for.
    decoded = map_with_path(lambda p, leaf: materialize(leaf) if p in specs else leaf, tree)
    batches = calibration_batches(pipeline, options)
    hessians = collect_hessians(pipeline.model.apply, decoded, batches, paths_rule(specs))
    new = {}
    for path, spec in specs.items():
      h, site = hessians[path]
      if site.layers is not None:
        raise UsageError(
          f"`quantize` after `factorize`: `{path}` is a stacked (scanned) kernel, whose factors "
          "span every layer; exclude it from one of the two stages."
        )
      new[path] = gptq_factors(
        path, flat[path], h, spec, damp=options["damp"], act_order=options["act_order"]
      )
  return map_with_path(lambda p, leaf: new.get(p, leaf), tree)
