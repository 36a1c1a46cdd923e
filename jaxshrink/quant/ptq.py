"""Post-training quantization: round-to-nearest weights, calibrated W8A8, per-rule settings.

`quantize_params` needs only the params (weight-only RTN). `ptq` adds calibration batches:
the exact contracting axes of every kernel as the model consumes it, SmoothQuant, and, with
`static_activations=True`, calibrated per-tensor activation scales (absmax / percentile / MSE
clipping); by default W8A8 activations get dynamic per-token scales at run time. Both return
a compressed tree whose kernels are `QArray`s; it runs (1) on any unmodified model via
`materialize` inside `jit`, (2) on the integer path via `jaxshrink.quant.quantized_apply`.

>>> ctree = ptq(model.apply, params, batches, ".*kernel", QuantSpec(bits=8), activation_bits=8,
...             overrides=[("conv1/kernel", LayerQuant(QuantSpec(bits=8)))])

`overrides` (and a rule list given as `rule`) are first-match: see `jaxshrink.quant.rules`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from jaxshrink.capture import Site, kernel_matrix
from jaxshrink.encoding import Encoding, materialize
from jaxshrink.errors import InvalidTypeError, InvalidValueError
from jaxshrink.model import accepts_models
from jaxshrink.quant import numerics
from jaxshrink.quant.calibrate import calibrate, check_batches, check_method
from jaxshrink.quant.qarray import QArray, default_contract_dims, normalize_contract_dims
from jaxshrink.quant.qarray import stack as stack_layers
from jaxshrink.quant.rules import Overrides, is_rule_list, resolve_layers
from jaxshrink.quant.spec import LayerQuant, QuantSpec
from jaxshrink.tree import Rule, flatten, map_with_path


def static_activation_scale(clip: float, bits: int) -> np.ndarray:
  """The `(1,)` float32 scale that maps a calibrated activation clip to the largest code."""
  return np.asarray([max(clip, 1e-30) / (2 ** (bits - 1) - 1)], np.float32)


def quantize_leaf(
  path: str,
  w: Any,
  layer: LayerQuant,
  *,
  contract_dims: tuple[int, ...] | Site | None = None,
  input_scale: np.ndarray | None = None,
  act_clip: float | np.ndarray | None = None,
  key: jax.Array | None = None,
) -> QArray:
  """One kernel -> `QArray` (RTN), with optional SmoothQuant scale and static act clip.

  `contract_dims` may be a `capture.Site` (from `collect` or `capture.find_sites`): a stacked
  site (`layers=L`, layers of `nn.scan` / `nnx.scan`) quantizes each `w[i]` as its own kernel
  (its own scales; `input_scale` `(L, K)` and `act_clip` `(L,)` per layer) into one stacked
  `QArray`.
  """
  if isinstance(w, Encoding):
    raise InvalidTypeError(
      f"`{path}` is already compressed ({w.describe()}); quantize the float params, or "
      "exclude it from the rule."
    )
  if isinstance(contract_dims, Site):
    site, contract_dims = contract_dims, contract_dims.contract_dims
    if site.layers is not None:
      keys = [None] * site.layers if key is None else list(jax.random.split(key, site.layers))
      clips = [None] * site.layers if act_clip is None else np.asarray(act_clip).reshape(-1)
      return stack_layers([
        quantize_leaf(
          path, w[i], layer, contract_dims=contract_dims,
          input_scale=None if input_scale is None else np.asarray(input_scale)[i],
          act_clip=None if clips[i] is None else float(clips[i]), key=keys[i],
        )
        for i in range(site.layers)
      ])  # fmt: skip
  spec = layer.spec
  dims = normalize_contract_dims(
    contract_dims or default_contract_dims(w.shape), max(w.ndim, 1), path
  )
  w2d = kernel_matrix(w, dims)
  numerics.check_float_matrix(w2d, path)
  if input_scale is not None:
    w2d = w2d * input_scale[:, None]
  scale, zp = numerics.compute_qparams(w2d, spec, path=path)
  codes = numerics.quantize_codes(w2d, scale, zp, spec, key=key)
  act_scale = None
  if layer.activation_bits is not None and act_clip is not None:
    act_scale = static_activation_scale(act_clip, layer.activation_bits)
  q = QArray.from_codes(
    codes, scale, zp, spec, shape=w.shape, dtype=w.dtype, contract_dims=dims,
    input_scale=input_scale,
  )  # fmt: skip
  if layer.activation_bits is None:
    return q
  return dataclasses.replace(q, act_bits=int(layer.activation_bits), act_scale=act_scale)


@accepts_models
def quantize_params(
  params: Any,
  rule: Rule | str | Overrides,
  spec: QuantSpec | LayerQuant | int | None = None,
  *,
  overrides: Overrides = (),
  contract_dims: dict[str, tuple[int, ...]] | None = None,
  key: jax.Array | None = None,
) -> Any:
  """Round-to-nearest quantization of every leaf `rule` selects.

  Args:
    params: float param tree (linen dict, nnx.State or plain dict).
    rule: which leaves (a `Rule` or include regex), e.g. `".*kernel"`; or a rule list
      (`[QuantRule(rule, setting)]`, `from_qwix(...)`) bundling each pattern with its
      settings, first match wins, leaves no rule matches stay float (then omit `spec`).
    spec: the default `QuantSpec` (weight-only) or `LayerQuant` (with activation bits; then
      activations use dynamic per-token scales, see `ptq` for static ones); an int `b` is
      `QuantSpec(bits=b)`.
    overrides: a first-match rule list, `[(rule, LayerQuant | QuantSpec | int | None)]`
      (see `jaxshrink.quant.rules`), checked before `rule`: the first one matching a leaf
      decides its setting; None keeps the leaf float.
    contract_dims: `{path: axes}` for kernels whose input axes are not all but the last.
    key: PRNG key for stochastic rounding.

  Raises:
    NoMatchError: `rule`, or a rule of a list, selects nothing.
    InvalidValueError: `spec` missing with a plain `rule`, or an unsupported setting.

  >>> ctree = quantize_params(params, ".*kernel", QuantSpec(bits=4, group_size=128))
  >>> ctree = quantize_params(params, [("head/kernel", 8), (".*kernel", QuantSpec(bits=4))])
  """
  if spec is None and not is_rule_list(rule):
    raise InvalidValueError(
      "quantize_params needs `spec` (e.g. QuantSpec(bits=8)) with a plain `rule`; or pass a "
      "rule list `[(rule, setting), ...]` as `rule`, which carries its own settings."
    )
  layers = resolve_layers(params, rule, spec, overrides)
  contract_dims = contract_dims or {}
  keys = {}
  if key is not None:
    keys = dict(zip(layers, jax.random.split(key, len(layers)), strict=True))

  def visit(path, leaf):
    if path not in layers:
      return leaf
    return quantize_leaf(
      path, leaf, layers[path], contract_dims=contract_dims.get(path), key=keys.get(path)
    )

  return map_with_path(visit, params)


@accepts_models
def ptq(
  apply_fn: Callable[[Any, Any], Any],
  params: Any,
  batches: Iterable[Any],
  rule: Rule | str,
  spec: QuantSpec | LayerQuant,
  *,
  activation_bits: int | None = None,
  static_activations: bool = False,
  calibration: str = "absmax",
  percentile: float = 99.99,
  smooth_alpha: float | None = None,
  overrides: Overrides = (),
) -> Any:
  """Calibrated post-training quantization.

  Args:
    apply_fn: `(params, x) -> outputs` (linen or nnx model's pure apply).
    params: float param tree.
    batches: calibration inputs (at least one).
    rule: which kernels.
    spec: default weight spec (or a `LayerQuant`).
    activation_bits: None for weight-only, 8 for W8A8 (default for layers without override).
    static_activations: store one calibrated activation scale per kernel; False (default)
      leaves `act_scale` None, so activations get a dynamic scale per token at run time.
    calibration: `absmax`, `percentile` or `mse` clipping of static activation scales.
    percentile: for `percentile`.
    smooth_alpha: SmoothQuant migration strength (0..1) for Dense-like kernels; None = off.
    overrides: per-rule settings, as in `quantize_params`.

  Raises:
    JaxshrinkError: empty calibration set or NaN/Inf in it. NoMatchError: a rule matches
      nothing. UsageError: `calibration="minmax"` (removed; use `absmax`). ValueError: an
      unknown `calibration`, or a clipping `calibration` with dynamic activation scales.
  """
  check_method(calibration, "calibration")  # before any calibration batch runs
  base = spec if isinstance(spec, LayerQuant) else LayerQuant(spec, activation_bits)
  layers = resolve_layers(params, rule, base, overrides)
  activations = any(q.activation_bits for q in layers.values())
  if activations and not static_activations and calibration != "absmax":
    raise InvalidValueError(
      f"`calibration={calibration!r}` clips static activation scales, so it needs "
      "`static_activations=True`; got `static_activations=False` (the default: dynamic scales, "
      "one per token, computed at run time). Pass `static_activations=True`, or drop "
      "`calibration`."
    )
  batches = check_batches(batches)
  kernel_rule = Rule(include="|".join(_escape(p) for p in layers), min_ndim=0)
  flat = flatten(params)
  input_scales = {}
  stats = calibrate(apply_fn, params, batches, kernel_rule, method="absmax")
  if smooth_alpha is not None:
    from jaxshrink.quant.smoothquant import smooth_scales

    for path, st in stats.items():
      if st.site.op == "dot_general" and layers[path].activation_bits is not None:
        absmax = [st.absmax] if st.site.layers is None else list(st.absmax)
        per_layer = [
          smooth_scales(a, np.asarray(kernel_matrix(w, st.site.contract_dims)), smooth_alpha)
          for a, w in zip(absmax, st.site.per_layer(flat[path]), strict=True)
        ]
        input_scales[path] = per_layer[0] if st.site.layers is None else np.stack(per_layer)
  # Clips are read only by static activation scales; dynamic ones need only the input axes.
  if activations and static_activations and (calibration != "absmax" or input_scales):
    stats = calibrate(
      apply_fn, params, batches, kernel_rule, method=calibration, percentile=percentile,
      input_scales=input_scales,
    )  # fmt: skip

  def visit(path, leaf):
    if path not in layers:
      return leaf
    layer = layers[path]
    st = stats[path]
    return quantize_leaf(
      path, leaf, layer, contract_dims=st.site,
      input_scale=input_scales.get(path),
      act_clip=st.clip if static_activations and layer.activation_bits else None,
    )  # fmt: skip

  return map_with_path(visit, params)


def _escape(path: str) -> str:
  import re

  return re.escape(path)


@dataclasses.dataclass(frozen=True)
class TableUse:
  """How the model reads a leaf that feeds a `gather` as its operand.

  Attributes:
    path: the leaf's path.
    rows: every gather of it is a row lookup (`jnp.take(table, ids, axis=0)`, `nn.Embed`).
    matmul: it also feeds a matmul (a tied output head, e.g. `nn.Embed.attend`).
  """

  path: str
  rows: bool
  matmul: bool


def gather_tables(apply_fn: Callable[..., Any], params: Any, *args: Any) -> dict[str, TableUse]:
  """Every float leaf the traced `apply_fn(params, *args)` uses as a `gather` operand.

  Word, position and token-type embeddings are found by use, not by name: the apply is
  replayed abstractly (`jax.eval_shape`, no compute) with `capture.replay_with` following each
  leaf through dtype casts and reshapes.
  """
  from jaxshrink.capture import LAYOUT_OPS, Derived, replay_with
  from jaxshrink.quant.serve import leaf_paths, row_lookup

  names = leaf_paths(params)
  uses: dict[str, dict[str, bool]] = {}

  def record(eqn, invals, in_src):
    name = eqn.primitive.name
    for i, src in enumerate(in_src):
      path = src.path if isinstance(src, Derived) else src
      if path is None:
        continue
      use = uses.setdefault(path, {"gather": False, "rows": True, "matmul": False})
      if name == "gather" and i == 0:
        use["gather"] = True
        whole = isinstance(src, str)  # a sliced or transposed table is not a row lookup
        use["rows"] &= whole and row_lookup(eqn.params, invals[0].shape, invals[1].shape)
      elif name in ("dot_general", "conv_general_dilated"):
        use["matmul"] = True
    return None

  def run(p, a):  # encodings of earlier stages (e.g. pruned kernels) count as one leaf each
    dense = materialize(p)
    return replay_with(apply_fn, dense, a, dict(enumerate(names)), record, layout_ops=LAYOUT_OPS)

  jax.eval_shape(run, params, args)
  return {p: TableUse(p, u["rows"], u["matmul"]) for p, u in uses.items() if u["gather"]}


def quantize_tables(params: Any, tables: Iterable[str], spec: QuantSpec | None) -> Any:
  """Quantizes each `(vocab, dim)` table in `tables` per row: one scale per token row (per
  `group_size` elements of it when grouped), as a `QArray` with `table=True`.

  Raises:
    ValueError: a table is not 2-D, or `group_size` does not divide its `dim`.
  """
  tables = set(tables) if spec is not None else set()

  def visit(path, leaf):
    if path not in tables:
      return leaf
    if len(leaf.shape) != 2:
      raise InvalidValueError(
        f"Embedding table `{path}` has shape {tuple(leaf.shape)}; per-row quantization needs "
        "a (vocab, dim) table. Leave `embeddings` unset, or reshape the table to 2-D."
      )
    if spec.group_size is not None and leaf.shape[1] % spec.group_size:
      raise InvalidValueError(
        f"`group_size`={spec.group_size} does not divide the rows of `{path}` (dim="
        f"{leaf.shape[1]}); pick a divisor of {leaf.shape[1]}, or null for one scale per row."
      )
    q = quantize_leaf(path, leaf, LayerQuant(spec), contract_dims=(1,))
    return dataclasses.replace(q, table=True)

  return map_with_path(visit, params)
