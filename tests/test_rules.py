"""One rule language: ordered, first-match rule lists bundling a pattern with its settings,
`min_ndim=2` by default, one error for a rule that selects nothing, and Qwix's rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxshrink as js
from jaxshrink.errors import (
  InvalidTypeError,
  InvalidValueError,
  JaxshrinkError,
  NoMatchError,
  UsageError,
)
from jaxshrink.quant import LayerQuant, QArray, QuantRule, QuantSpec, from_qwix, quantize_params
from jaxshrink.quant.rules import resolve_layers
from jaxshrink.quant.spec import as_layer_quant
from jaxshrink.sparsity import Pruner
from jaxshrink.tree import Rule, flatten


def _params():
  rng = np.random.default_rng(0)
  layer = lambda k, n: {  # noqa: E731
    "kernel": rng.normal(size=(k, n)).astype(np.float32),
    "bias": rng.normal(size=(n,)).astype(np.float32),
  }
  return {"embed": layer(16, 32), "block": {"mlp": layer(32, 32)}, "head": layer(32, 8)}


def _bits(tree):
  return {p: leaf.spec.bits for p, leaf in flatten(tree).items() if isinstance(leaf, QArray)}


def test_errors_are_jaxshrink_errors_and_keep_the_builtin_base():
  assert issubclass(UsageError, JaxshrinkError) and issubclass(UsageError, ValueError)
  assert issubclass(InvalidValueError, ValueError) and issubclass(InvalidTypeError, TypeError)
  assert issubclass(NoMatchError, JaxshrinkError) and issubclass(NoMatchError, ValueError)


def test_rule_list_is_first_match_and_skips_vectors():
  rules = [("head/kernel", QuantSpec(bits=8)), (".*", QuantSpec(bits=4, group_size=16))]
  tree = quantize_params(_params(), rules)
  assert _bits(tree) == {"embed/kernel": 4, "block/mlp/kernel": 4, "head/kernel": 8}
  # Biases: `.*` is `Rule(include=".*")`, which selects 2-D and larger leaves only.
  assert not isinstance(tree["head"]["bias"], QArray)


def test_overrides_are_first_match_before_the_default():
  overrides = [
    QuantRule("head/kernel", None),  # keeps float
    QuantRule(Rule("block/.*"), LayerQuant(QuantSpec(bits=8), activation_bits=8)),
  ]
  tree = quantize_params(_params(), ".*kernel", QuantSpec(bits=4), overrides=overrides)
  assert _bits(tree) == {"embed/kernel": 4, "block/mlp/kernel": 8}
  assert tree["block"]["mlp"]["kernel"].act_bits == 8
  assert isinstance(tree["head"]["kernel"], np.ndarray)


def test_a_rule_written_for_last_wins_fails_loudly():
  overrides = [(".*kernel", QuantSpec(bits=4)), ("head/kernel", QuantSpec(bits=8))]
  with pytest.raises(NoMatchError, match=r"`overrides\[1\]`.*taken by `overrides\[0\]`"):
    quantize_params(_params(), ".*kernel", QuantSpec(bits=8), overrides=overrides)
  with pytest.raises(NoMatchError, match=r"`rules\[1\]`.*matched no parameter"):
    quantize_params(_params(), [(".*kernel", 4), ("decoder/.*", 8)])


def _apply(p, x):
  for name in ("embed", "block", "head"):
    layer = p[name]["mlp"] if name == "block" else p[name]
    x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
  return x


def test_ptq_takes_a_rule_list_in_place_of_rule_and_spec():
  x = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
  rules = [("head/kernel", None), (".*kernel", LayerQuant(QuantSpec(bits=8), activation_bits=8))]
  tree = js.ptq(_apply, _params(), [x], rules, None)
  assert _bits(tree) == {"embed/kernel": 8, "block/mlp/kernel": 8}
  assert tree["embed"]["kernel"].act_bits == 8 and isinstance(tree["head"]["kernel"], np.ndarray)


def test_int_is_the_one_documented_shorthand():
  base = LayerQuant(QuantSpec(bits=8), activation_bits=8)
  assert as_layer_quant(4, base) == LayerQuant(QuantSpec(bits=4), 8)
  assert as_layer_quant(QuantSpec(bits=3)) == LayerQuant(QuantSpec(bits=3))
  assert as_layer_quant(None) == LayerQuant(None)
  assert as_layer_quant(base) is base
  with pytest.raises(InvalidTypeError, match="got float 4.0"):
    as_layer_quant(4.0)
  with pytest.raises(InvalidTypeError, match="QuantRule or a"):
    quantize_params(_params(), [("head/kernel",)])
  with pytest.raises(InvalidValueError, match="needs `spec`"):
    quantize_params(_params(), ".*kernel")
  with pytest.raises(InvalidValueError, match="`activation_bits` must be null"):
    resolve_layers(_params(), ".*kernel", LayerQuant(QuantSpec(), activation_bits=6))
  assert _bits(quantize_params(_params(), ".*kernel", 4)) == dict.fromkeys(
    ["embed/kernel", "block/mlp/kernel", "head/kernel"], 4
  )


def test_pruner_overrides_are_first_match_and_must_select():
  params = {k: v for k, v in _params().items()}
  pruner = Pruner(".*kernel", 0.5, overrides=[("head/kernel", 0.0), (Rule(".*"), 0.75)])
  masks = flatten(pruner.masks(params))
  assert bool(np.all(masks["head/kernel"]))
  assert float(1 - np.mean(masks["embed/kernel"])) == 0.75
  with pytest.raises(NoMatchError, match=r"`overrides\[1\]`.*taken by an earlier override"):
    Pruner(".*kernel", 0.5, overrides={".*": 0.75, "head/kernel": 0.0}).masks(params)
  with pytest.raises(NoMatchError, match=r"`overrides\[0\]` 'nope'.*matches no pruned layer"):
    Pruner(".*kernel", 0.5, overrides={"nope": 0.0}).masks(params)
  with pytest.raises(InvalidValueError, match="not a valid regex"):
    Pruner(".*kernel", 0.5, overrides={"(": 0.0})


def test_encode_sparse_parses_the_structure_string():
  w = np.arange(1, 33, dtype=np.float32).reshape(8, 4)
  pruned = {"d": {"kernel": np.asarray(js.sparsity.nm_mask(jnp.asarray(w), 2, 4)) * w}}
  enc = js.sparsity.encode_sparse(pruned, ".*kernel", structure="2:4")["d"]["kernel"]
  assert isinstance(enc, js.NMSparse) and (enc.n, enc.m) == (2, 4)
  with pytest.raises(InvalidValueError, match="Unknown structure '2-4'"):
    js.sparsity.encode_sparse(pruned, ".*kernel", structure="2-4")


def test_one_contract_dims_default():
  from jaxshrink.lowrank.encoding import default_contract_dims as lowrank_default
  from jaxshrink.quant.qarray import default_contract_dims

  assert lowrank_default is default_contract_dims
  assert default_contract_dims((3, 3, 4, 8)) == (0, 1, 2) and default_contract_dims((4,)) == (0,)


# --- Qwix ---------------------------------------------------------------------------------

qwix = pytest.importorskip("qwix")


def test_from_qwix_maps_real_qt_rules_in_order():
  rules = from_qwix(
    [
      qwix.QtRule(module_path="head", weight_qtype=jnp.int8, act_qtype=jnp.int8),
      qwix.QtRule(module_path="embed"),  # no weight_qtype: stays float
      qwix.QtRule(module_path=".*", weight_qtype="int4", tile_size=16),
    ]
  )
  assert [r.rule.include for r in rules] == ["(?:head)/kernel", "(?:embed)/kernel", "(?:.*)/kernel"]
  assert rules[0].setting == LayerQuant(QuantSpec(bits=8), activation_bits=8)
  assert rules[1].setting is None
  assert rules[2].setting == LayerQuant(QuantSpec(bits=4, group_size=16))
  tree = quantize_params(_params(), rules)
  assert _bits(tree) == {"block/mlp/kernel": 4, "head/kernel": 8}
  assert tree["block"]["mlp"]["kernel"].spec.group_size == 16
  fp8 = from_qwix([qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.float8_e4m3fn)])
  assert fp8[0].setting.spec == QuantSpec(bits=8, format="fp8_e4m3")
  asym = from_qwix([qwix.QtRule(weight_qtype="int8", weight_calibration_method="minmax")])
  assert asym[0].setting.spec.symmetric is False
  # Under jit the converted tree runs as float: decoding matches the quantized values.
  dense = jax.jit(js.materialize)(tree)
  assert dense["head"]["kernel"].shape == (32, 8)


@pytest.mark.parametrize(
  ("rule", "match"),
  [
    (dict(weight_qtype="int8", op_names=("einsum",)), r"\[0\] sets `op_names=\('einsum',\)`"),
    (dict(weight_qtype="int8", act_qtype="int8", act_static_scale=True), "act_static_scale"),
    (dict(weight_qtype="int8", bwd_qtype="int8"), "`bwd_qtype='int8'`.*backward"),
    (dict(weight_qtype="int8", tile_size=0.25), r"`tile_size=0.25`"),
    (dict(weight_qtype="nf4"), r"`weight_qtype='nf4'` is not supported"),
    (dict(weight_qtype="int8", act_qtype="float8_e4m3fn"), "`act_qtype='float8_e4m3fn'`"),
    (dict(act_qtype="int8"), "`act_qtype` without `weight_qtype`"),
    (dict(weight_qtype="int8", weight_calibration_method="rms,3"), "weight_calibration_method"),
  ],
)
def test_from_qwix_refuses_what_it_cannot_map(rule, match):
  with pytest.raises(UsageError, match=match):
    from_qwix([qwix.QtRule(**rule)])


def test_from_qwix_refuses_other_objects():
  with pytest.raises(InvalidTypeError, match="entry \\[0\\] is a str"):
    from_qwix([".*"])
