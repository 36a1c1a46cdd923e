"""Per-layer quantization settings as one ordered, first-match rule list, and Qwix's rules.

A rule list is `[QuantRule(rule, setting), ...]` (or plain `(rule, setting)` pairs): `rule`
says which leaves (a `jaxshrink.Rule`, or an include regex with `min_ndim=2`), `setting` how
(a `LayerQuant`; the shorthands `QuantSpec`, an int of weight bits, or None to keep the leaves
float, see `jaxshrink.quant.spec.as_layer_quant`). The first rule that matches a leaf decides
its setting, as in Qwix; a rule that selects nothing is a `NoMatchError`, so a list written
for "the last rule wins" (a catch-all first, the exceptions after it) fails instead of
silently dropping the exceptions.

Every function with `overrides` (`quantize_params`, `ptq`, `gptq`, `awq`, `qat_apply`) reads
them this way, before its `rule` / `spec` default; `quantize_params` and `ptq` also take a
rule list in place of `rule` (then leaves no rule matches stay float).

`from_qwix` turns Qwix `QtRule` / `QuantizationRule` lists into such a list:

>>> rules = from_qwix([qwix.QtRule(module_path="head", weight_qtype="int8"),
...                    qwix.QtRule(module_path=".*", weight_qtype="int4", tile_size=128)])
>>> ctree = quantize_params(params, rules)   # head/kernel int8, other kernels int4 g128
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxshrink.errors import InvalidTypeError, UsageError
from jaxshrink.quant.spec import LayerQuant, QuantSpec, as_layer_quant
from jaxshrink.tree import Rule, as_rule, first_match, flatten, select

Setting = LayerQuant | QuantSpec | int | None


@dataclasses.dataclass(frozen=True)
class QuantRule:
  """One entry of a rule list: which leaves, and how they are quantized.

  Unpacks like a `(rule, setting)` pair, so it fits wherever pairs do.

  Attributes:
    rule: a `Rule`, or an include regex (`Rule(include=regex)`, `min_ndim=2`).
    setting: `LayerQuant`, or a shorthand: `QuantSpec`, int weight bits, None (keep float).

  >>> QuantRule("head/kernel", QuantSpec(bits=8))
  """

  rule: Rule | str
  setting: Setting

  def __post_init__(self):
    object.__setattr__(self, "rule", as_rule(self.rule))
    as_layer_quant(self.setting)  # refuses a wrong kind of setting here, not at first use

  def __iter__(self):
    return iter((self.rule, self.setting))


# An ordered rule list, as `overrides` of every quantization function takes it.
Overrides = Sequence[QuantRule | tuple[Rule | str, Setting]]


def quant_rules(entries: Any, *, what: str = "overrides") -> list[QuantRule]:
  """`entries` (`QuantRule`s or `(rule, setting)` pairs) as a list of `QuantRule`s.

  Raises:
    InvalidTypeError: the list is a mapping or string, or an entry is not a rule and setting.
  """
  if isinstance(entries, (str, Rule, dict)) or not isinstance(entries, Sequence):
    raise InvalidTypeError(
      f"`{what}` must be a list of QuantRule(rule, setting) or (rule, setting) pairs, most "
      f"specific first; got {type(entries).__name__}."
    )
  out = []
  for i, entry in enumerate(entries):
    if isinstance(entry, QuantRule):
      out.append(entry)
    elif isinstance(entry, tuple) and len(entry) == 2:
      out.append(QuantRule(*entry))
    else:
      raise InvalidTypeError(
        f"`{what}[{i}]` must be a QuantRule or a (rule, setting) pair; got {entry!r}."
      )
  return out


def is_rule_list(rule: Any) -> bool:
  """True for a rule list (settings bundled), False for a plain `Rule` or regex."""
  return not isinstance(rule, (str, Rule)) and isinstance(rule, Sequence)


def resolve_layers(
  params: Any,
  rule: Rule | str | Overrides,
  base: LayerQuant | QuantSpec | int | None,
  overrides: Overrides = (),
) -> dict[str, LayerQuant]:
  """`{path: LayerQuant}` of every leaf to quantize, in flattening order.

  `overrides` are a first-match rule list; leaves none of them matches and `rule` selects get
  `base`. A rule list in place of `rule` is appended to `overrides` (then no default: leaves
  no rule matches stay float). A setting of None keeps its leaves float (left out here).

  Raises:
    NoMatchError: `rule` matches nothing, or a rule of the list selects nothing (it matches no
      leaf, or only leaves an earlier rule took).
    InvalidValueError: a setting with unsupported bits, format or activation bits.
  """
  base = as_layer_quant(base)
  entries = quant_rules(overrides)
  default: list[str] = []
  if is_rule_list(rule):
    entries += quant_rules(rule, what="rules")
  else:
    default = select(params, rule)
  what = "rules" if is_rule_list(rule) and not overrides else "overrides"
  label = "Override" if what == "overrides" else "Rule"
  chosen = first_match(params, [(q.rule, q.setting) for q in entries], what=what, label=label)
  layers = {p: as_layer_quant(s, base) for p, s in chosen.items()}
  for path in default:
    layers.setdefault(path, base)
  ordered = {p: layers[p] for p in flatten(params) if p in layers}
  for path, layer in ordered.items():
    layer.validate(path)
  return {p: layer for p, layer in ordered.items() if layer.spec is not None}


# Qwix field -> why jaxshrink cannot honour it when set away from its default.
_QWIX_UNSUPPORTED = {
  "op_names": "jaxshrink selects leaves by path, not by the op that reads them; narrow "
  "`module_path` instead",
  "act_static_scale": "static activation scales are one switch for the whole call: pass "
  "`static_activations=True` to `ptq`",
  "act_batch_axes": "activation scales are per token (dynamic) or per tensor (static)",
  "disable_channelwise_axes": "weights always get per-channel (or per-group) scales",
}
_QWIX_INTS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}
_QWIX_FP8 = {"float8_e4m3fn": "fp8_e4m3", "float8_e4m3": "fp8_e4m3", "float8_e5m2": "fp8_e5m2"}


def _qtype_name(qtype: Any) -> str:
  if isinstance(qtype, str):
    return qtype
  try:
    return np.dtype(qtype).name
  except TypeError:
    return str(qtype)


def _weight_spec(rule: Any, index: int) -> QuantSpec:
  name = _qtype_name(rule.weight_qtype)
  tile = rule.tile_size
  if tile is not None and (isinstance(tile, bool) or not isinstance(tile, (int, np.integer))):
    raise UsageError(
      f"Qwix rule [{index}] `tile_size={tile!r}`: jaxshrink groups take a fixed size (its "
      "`group_size`), not a fraction of the axis. Pass an int tile size."
    )
  method = rule.weight_calibration_method
  if method not in ("absmax", "minmax"):
    raise UsageError(
      f"Qwix rule [{index}] `weight_calibration_method={method!r}` is not supported: "
      "jaxshrink scales weights by absmax (symmetric) or min/max (asymmetric)."
    )
  group = None if tile is None else int(tile)
  if name in _QWIX_INTS:
    return QuantSpec(bits=_QWIX_INTS[name], symmetric=method == "absmax", group_size=group)
  if name in _QWIX_FP8:
    if method != "absmax":
      raise UsageError(
        f"Qwix rule [{index}] `weight_calibration_method={method!r}` with `weight_qtype` "
        f"{name}: fp8 formats are symmetric; use absmax."
      )
    return QuantSpec(bits=8, format=_QWIX_FP8[name], group_size=group)
  raise UsageError(
    f"Qwix rule [{index}] `weight_qtype={name!r}` is not supported; jaxshrink stores "
    f"{', '.join([*_QWIX_INTS, *_QWIX_FP8])}."
  )


def _activation_bits(rule: Any, index: int) -> int | None:
  if rule.act_qtype is None:
    return None
  name = _qtype_name(rule.act_qtype)
  if name not in ("int8", "int4"):
    raise UsageError(
      f"Qwix rule [{index}] `act_qtype={name!r}` is not supported; jaxshrink quantizes "
      "activations to int8 or int4."
    )
  if rule.act_calibration_method not in (None, "absmax"):
    raise UsageError(
      f"Qwix rule [{index}] `act_calibration_method={rule.act_calibration_method!r}`: "
      "activation clipping is one setting of the call (`calibration=` of `ptq`); leave it unset."
    )
  return _QWIX_INTS[name]


def from_qwix(rules: Sequence[Any], *, leaf: str = "kernel") -> list[QuantRule]:
  """A jaxshrink rule list from Qwix `QtRule` / `QuantizationRule`s, order and meaning kept.

  Qwix matches a module path (`re.fullmatch(module_path, "block_0/mlp")`) and quantizes the
  ops of that module; jaxshrink matches leaf paths, so each rule selects
  `(?:{module_path})/{leaf}`, the module's kernel. Both take the first matching rule.

  | Qwix field | jaxshrink |
  |---|---|
  | `module_path` | `Rule(include=f"(?:{module_path})/kernel")` |
  | `weight_qtype` int8 / int4 / int3 / int2 | `QuantSpec(bits=8 / 4 / 3 / 2)` |
  | `weight_qtype` float8_e4m3fn / float8_e5m2 | `QuantSpec(format="fp8_e4m3" / "fp8_e5m2")` |
  | `weight_qtype` None | None: the module's kernel stays float |
  | `tile_size` (int) | `group_size` |
  | `act_qtype` int8 / int4 | `activation_bits` 8 / 4 (dynamic per-token scales) |
  | `weight_calibration_method` absmax / minmax | `symmetric` True / False |

  Any other field set away from its default (`op_names`, `act_static_scale`, a float
  `tile_size`, the backward-pass fields of `QtRule`, ...) is a `UsageError` naming it.

  Args:
    rules: Qwix rules, in Qwix's order (first match wins in both).
    leaf: the name of the quantized leaf inside each module (`kernel` for Flax layers).

  Raises:
    UsageError: a rule sets a field jaxshrink cannot honour, or a qtype it does not store.
    InvalidTypeError: an entry is not a Qwix rule.
  """
  out = []
  for index, rule in enumerate(rules):
    if not dataclasses.is_dataclass(rule) or not hasattr(rule, "module_path"):
      raise InvalidTypeError(
        f"from_qwix takes qwix.QtRule / qwix.QuantizationRule objects; entry [{index}] is a "
        f"{type(rule).__name__}."
      )
    handled = {
      "module_path", "weight_qtype", "act_qtype", "tile_size", "weight_calibration_method",
      "act_calibration_method",
    }  # fmt: skip
    for field in dataclasses.fields(rule):
      if field.name in handled:
        continue
      value = getattr(rule, field.name)
      default = field.default
      if field.default_factory is not dataclasses.MISSING:  # pragma: no cover - none in qwix
        default = field.default_factory()
      if value is None or value == default or (field.name == "act_static_scale" and not value):
        continue
      why = _QWIX_UNSUPPORTED.get(field.name, "a training (backward pass) setting jaxshrink "
                                  "does not read")  # fmt: skip
      raise UsageError(
        f"Qwix rule [{index}] sets `{field.name}={value!r}`, which from_qwix cannot map: {why}. "
        "Remove it from the rule."
      )
    pattern = f"(?:{rule.module_path})/{re.escape(leaf)}"
    if rule.weight_qtype is None:
      if rule.act_qtype is not None:
        raise UsageError(
          f"Qwix rule [{index}] sets `act_qtype` without `weight_qtype`: jaxshrink quantizes "
          "activations only beside quantized weights. Set `weight_qtype` too."
        )
      out.append(QuantRule(Rule(include=pattern), None))
      continue
    setting = LayerQuant(_weight_spec(rule, index), _activation_bits(rule, index))
    out.append(QuantRule(Rule(include=pattern), setting))
  return out
