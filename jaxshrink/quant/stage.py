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

from jaxshrink.capture import find_sites
from jaxshrink.encoding import materialize
from jaxshrink.errors import UsageError
from jaxshrink.quant.calibrate import calibrate, check_method
from jaxshrink.quant.ptq import (
  LayerQuant,
  gather_tables,
  ptq,
  quantize_params,
  quantize_tables,
  resolve_layers,
  static_activation_scale,
)
from jaxshrink.quant.spec import QuantSpec
from jaxshrink.recipes import RULE_OPTIONS, Pipeline, register_stage, rule_from_options
from jaxshrink.tree import Rule, flatten, map_with_path

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
  "static_activations": False,  # dynamic per-token scales; true = calibrated per tensor
  "steps": 200,
  "learning_rate": 1e-4,
  "alpha": 0.5,
  "act_order": True,  # GPTQ: quantize inputs by decreasing Hessian diagonal (better on tiny-lm)
  "damp": 0.01,  # GPTQ: Hessian damping, as a fraction of its mean diagonal
  "grid": 20,  # AWQ: points of the scale-exponent search
  "overrides": [],
  "embeddings": None,  # e.g. {bits: 8}: gathered tables (word/position/token-type), per row
}
EMBEDDING_KEYS = {"bits": 8, "group_size": None, "symmetric": True, "overrides": []}
# Keys only some methods read, and what they mean (for the refusal's message).
METHOD_KEYS = {
  "steps": (("qat",), "QAT fine-tuning steps"),
  "learning_rate": (("qat",), "the QAT learning rate"),
  "alpha": (("smoothquant",), "SmoothQuant's migration strength"),
  "act_order": (("gptq",), "GPTQ's input order"),
  "damp": (("gptq",), "GPTQ's Hessian damping"),
  "grid": (("awq",), "AWQ's scale-exponent search"),
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
  if method not in CALIBRATED and options["calibration_batches"] != OPTIONS["calibration_batches"]:
    refuse(
      "calibration_batches",
      f"weight-only {method} reads no calibration data",
      fix.format("calibration_batches"),
    )


def calibration_batches(pipeline: Pipeline, count: int) -> list:
  """`count` training batches of the model's batch size (first ones, deterministic)."""
  if count < 1:
    raise UsageError(f"`calibration_batches` must be >= 1; got {count}.")
  x = np.asarray(pipeline.dataset.x_train)
  size = pipeline.model.batch_size
  return [x[i * size : (i + 1) * size] for i in range(count) if i * size < len(x)]


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
    from jaxshrink.quant.gptq import paths_rule

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
  model, tree = pipeline.model, pipeline.tree
  layers = resolve_layers(tree, rule, layer, overrides)
  check_method(options["calibration"], "calibration")  # before GPTQ/AWQ/QAT spend any time
  _check_keys(options, layers)
  activations = any(q.activation_bits for q in layers.values())
  tables = _embedding_tables(pipeline, options, layers)
  if method == "rtn" and not activations:
    sites = _stacked_sites(pipeline, tree, rule)
    tree = quantize_params(tree, rule, layer, overrides=overrides, contract_dims=sites)
    return dataclasses.replace(pipeline, tree=_tables(tree, tables))
  batches = calibration_batches(pipeline, options["calibration_batches"])
  act_options = {
    "calibration": options["calibration"],
    "static_activations": options["static_activations"],
  }
  if method in ("rtn", "smoothquant"):
    tree = ptq(
      model.apply, tree, batches, rule, layer, overrides=overrides,
      smooth_alpha=options["alpha"] if method == "smoothquant" else None, **act_options,
    )  # fmt: skip
  elif method == "qat":
    from jaxshrink.quant.qat import qat_finetune

    ds = pipeline.dataset
    trained = qat_finetune(
      model.apply, tree, ds.x_train, ds.y_train, rule, layer, steps=options["steps"],
      learning_rate=options["learning_rate"], batch_size=model.batch_size, overrides=overrides,
    ).params  # fmt: skip
    if activations:
      tree = ptq(model.apply, trained, batches, rule, layer, overrides=overrides, **act_options)
    else:
      sites = _stacked_sites(pipeline, trained, rule)
      tree = quantize_params(trained, rule, layer, overrides=overrides, contract_dims=sites)
  else:
    # GPTQ/AWQ quantize weights; the layers' activation bits are added on top.
    weight_overrides = [(r, None if o is None else o.spec) for r, o in overrides]
    if method == "gptq":
      from jaxshrink.quant.gptq import gptq

      quantized = gptq(
        model.apply, tree, batches, rule, layer.spec, damp=options["damp"],
        act_order=options["act_order"], overrides=weight_overrides,
      )  # fmt: skip
    else:
      from jaxshrink.quant.awq import awq

      quantized = awq(
        model.apply, tree, batches, rule, layer.spec, grid=options["grid"],
        overrides=weight_overrides,
      )  # fmt: skip
    tree = with_activations(model.apply, tree, quantized, batches, layers, **act_options)
  return dataclasses.replace(pipeline, tree=_tables(tree, tables))


def _tables(tree: Any, specs: dict[str, QuantSpec]) -> Any:
  try:
    for spec in dict.fromkeys(specs.values()):  # one pass per distinct spec, in order
      tree = quantize_tables(tree, [p for p, s in specs.items() if s == spec], spec)
  except ValueError as err:  # e.g. a group size that does not divide a table's rows
    raise UsageError(f"`embeddings` of `quantize`: {err}") from None
  return tree


def _table_spec(entry: dict[str, Any], where: str) -> QuantSpec:
  spec = QuantSpec(bits=entry["bits"], symmetric=entry["symmetric"], group_size=entry["group_size"])
  try:
    spec.validate(where)
  except (TypeError, ValueError) as err:
    raise UsageError(f"`{where}` of `quantize`: {err}") from None
  return spec


def table_specs(options: dict[str, Any], paths: list[str]) -> dict[str, QuantSpec]:
  """`{path: QuantSpec}` of the gathered tables `paths` under `embeddings` and its overrides.

  Raises:
    UsageError: `embeddings` or an override is not a mapping of known keys, a spec is
      invalid, or an override's `target` matches no table.
  """
  emb = options["embeddings"]
  keys = sorted(EMBEDDING_KEYS)
  if not isinstance(emb, dict) or set(emb) - set(EMBEDDING_KEYS):
    raise UsageError(
      f"`embeddings` of `quantize` must be null or a mapping with keys from {keys}; got "
      f"{emb!r}. E.g. `embeddings: {{bits: 8}}` (int8 per row) or `{{bits: 4, group_size: 32}}`."
    )
  base = {**EMBEDDING_KEYS, **emb}
  specs = dict.fromkeys(paths, _table_spec(base, "embeddings"))
  if not isinstance(base["overrides"], list):
    raise UsageError(f"`embeddings.overrides` of `quantize` must be a list; got {emb!r}.")
  taken: set[str] = set()  # first match wins: a table keeps the first override's spec
  for i, entry in enumerate(base["overrides"]):
    where = f"embeddings.overrides[{i}]"
    valid = {"target", "bits", "group_size", "symmetric"}
    if not isinstance(entry, dict) or "target" not in entry or set(entry) - valid:
      raise UsageError(
        f"`{where}` of `quantize` must be a mapping with a `target` regex and keys from "
        f"{sorted(valid)}; got {entry!r}."
      )
    hits = [p for p in paths if Rule(include=entry["target"], min_ndim=0).matches(p, None)]
    if not hits:
      raise UsageError(
        f"`{where}.target` {entry['target']!r} of `quantize` matches no embedding table; the "
        f"tables are {', '.join(paths)}."
      )
    free = [p for p in hits if p not in taken]
    if not free:
      raise UsageError(
        f"`{where}.target` {entry['target']!r} of `quantize` selects nothing: its tables "
        f"({', '.join(hits)}) are taken by an earlier override. Overrides are first-match: put "
        "the more specific one first."
      )
    spec = _table_spec({**base, **entry}, where)
    specs.update(dict.fromkeys(free, spec))
    taken.update(free)
  return specs


def _embedding_tables(pipeline: Pipeline, options: dict[str, Any], layers) -> dict:
  """`{path: QuantSpec}` of the tables `embeddings` quantizes: leaves read by row lookups."""
  if options["embeddings"] is None:
    return {}
  sample = calibration_batches(pipeline, 1)[0]
  uses = gather_tables(pipeline.model.apply, pipeline.tree, sample)
  if not uses:
    raise UsageError(
      "`embeddings` of `quantize` is set, but the model reads no parameter by gather (no "
      "embedding table). Remove `embeddings`."
    )
  twice = sorted(set(uses) & set(layers))
  if twice:
    raise UsageError(
      f"`{twice[0]}` is an embedding table (read by gather) and is also selected by `target`; "
      "`embeddings` quantizes it per row. Exclude it from `target` (e.g. `exclude: "
      f"'{twice[0]}'`), or remove `embeddings`."
    )
  # A table gathered some other way (sliced, transposed, batched) is left float.
  return table_specs(options, [path for path, use in uses.items() if use.rows])
