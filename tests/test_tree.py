"""Paths and rules on linen variable dicts and nnx states."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxshrink import NoMatchError, Rule, flatten, map_selected, select
from jaxshrink.errors import InvalidTypeError, InvalidValueError, JaxshrinkError
from jaxshrink.tree import first_match, flatten_with_keys, map_with_path, params_of, unflatten


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), name="conv1")(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(10, name="dense1")(x)


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.dense1 = nnx.Linear(4 * 8 * 8, 10, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(10, 10, rngs=rngs) for _ in range(2)])

  def __call__(self, x):
    x = self.conv1(x).reshape(x.shape[0], -1)
    x = self.dense1(x)
    for block in self.blocks:
      x = block(x)
    return x


@pytest.fixture(scope="module")
def linen_variables():
  return LinenNet().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


@pytest.fixture(scope="module")
def nnx_state():
  _, state, _ = nnx.split(NnxNet(nnx.Rngs(0)), nnx.Param, ...)
  return state


def test_linen_paths_look_through_params_collection(linen_variables):
  assert list(flatten(linen_variables)) == [
    "conv1/bias",
    "conv1/kernel",
    "dense1/bias",
    "dense1/kernel",
  ]


def test_nnx_paths_match_linen_and_use_list_indices(nnx_state):
  paths = list(flatten(nnx_state))
  assert "conv1/kernel" in paths and "dense1/kernel" in paths
  assert "blocks/0/kernel" in paths and "blocks/1/bias" in paths
  assert all(not p.endswith("/value") for p in paths)


def test_nnx_leaves_are_the_arrays(nnx_state):
  leaf = flatten(nnx_state)["conv1/kernel"]
  assert leaf.shape == (3, 3, 1, 4)


@pytest.mark.parametrize(
  ("rule", "expected"),
  [
    (Rule(include=".*kernel"), ["conv1/kernel", "dense1/kernel"]),
    (Rule(include=".*", exclude="conv1/.*", min_ndim=0), ["dense1/bias", "dense1/kernel"]),
    (Rule(), ["conv1/kernel", "dense1/kernel"]),  # min_ndim=2 by default: no biases
    (Rule(min_ndim=0), ["conv1/bias", "conv1/kernel", "dense1/bias", "dense1/kernel"]),
    (Rule(min_size=100), ["dense1/kernel"]),
    (Rule(include="dense1/(kernel|bias)", min_ndim=1), ["dense1/bias", "dense1/kernel"]),
  ],
)
def test_rule_selection(linen_variables, rule, expected):
  assert select(linen_variables, rule) == expected


def test_rule_is_a_full_match(linen_variables):
  # "kernel" alone does not match "conv1/kernel": patterns match the whole path.
  with pytest.raises(NoMatchError):
    select(linen_variables, "kernel")


def test_same_rule_selects_same_paths_in_both_frameworks(linen_variables, nnx_state):
  rule = Rule(include="(conv1|dense1)/kernel")
  assert select(linen_variables, rule) == select(nnx_state, rule)


def test_no_match_error_lists_existing_paths(linen_variables):
  with pytest.raises(NoMatchError, match=r"matched no parameter.*conv1/kernel.*dense1/kernel"):
    select(linen_variables, Rule(include="encoder/.*"))


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"include": "conv1/(kernel"}, ValueError, "not a valid regex"),
    ({"exclude": "[a"}, ValueError, "not a valid regex"),
    ({"include": 3}, TypeError, "must be a regex string"),
    ({"min_ndim": -1}, ValueError, "non-negative"),
    ({"min_size": True}, ValueError, "non-negative"),
  ],
)
def test_bad_rules(kwargs, error, match):
  with pytest.raises(error, match=match) as info:
    Rule(**kwargs)
  assert isinstance(info.value, JaxshrinkError)
  assert isinstance(info.value, (InvalidTypeError, InvalidValueError))


def test_default_min_ndim_is_two_and_the_no_match_error_says_why(linen_variables):
  assert Rule().min_ndim == 2 and Rule(".*bias").describe() == "Rule(include='.*bias')"
  with pytest.raises(NoMatchError, match=r"`conv1/bias`, `dense1/bias`.*min_ndim=1"):
    select(linen_variables, ".*bias")
  assert select(linen_variables, Rule(".*bias", min_ndim=1)) == ["conv1/bias", "dense1/bias"]


def test_first_match_takes_the_first_rule_that_matches(linen_variables):
  rules = [("dense1/kernel", 8), (".*kernel", 4), (Rule(".*bias", min_ndim=1), None)]
  assert first_match(linen_variables, rules) == {
    "conv1/bias": None,
    "conv1/kernel": 4,
    "dense1/bias": None,
    "dense1/kernel": 8,
  }


def test_first_match_refuses_a_rule_that_selects_nothing(linen_variables):
  with pytest.raises(NoMatchError, match=r"`rules\[1\]`: Rule\(include='encoder/.\*'\) matched"):
    first_match(linen_variables, [(".*kernel", 4), ("encoder/.*", 8)])
  # Written for "the last rule wins": the exception after the catch-all would never apply.
  with pytest.raises(NoMatchError, match=r"`overrides\[1\]`.*taken by `overrides\[0\]`.*first"):
    first_match(linen_variables, [(".*kernel", 4), ("dense1/kernel", 8)], what="overrides")


def test_map_selected_keeps_linen_wrapper_and_other_leaves(linen_variables):
  out = map_selected(lambda path, w: jnp.zeros_like(w), linen_variables, ".*kernel")
  assert set(out) == {"params"}
  flat = flatten(out)
  assert float(jnp.abs(flat["dense1/kernel"]).sum()) == 0.0
  np.testing.assert_array_equal(flat["dense1/bias"], flatten(linen_variables)["dense1/bias"])


def test_map_selected_on_nnx_state_returns_state_usable_by_merge(nnx_state):
  graphdef, _, rest = nnx.split(NnxNet(nnx.Rngs(0)), nnx.Param, ...)
  zeroed = map_selected(lambda path, w: w * 0, nnx_state, ".*kernel")
  model = nnx.merge(graphdef, zeroed, rest)
  assert float(jnp.abs(model.dense1.kernel[...]).sum()) == 0.0


def test_flatten_unflatten_round_trip_keeps_int_keys(nnx_state):
  pure = nnx.to_pure_dict(nnx_state)
  entries = [(keys, leaf) for _, keys, leaf in flatten_with_keys(pure)]
  rebuilt = unflatten(entries)
  assert jax.tree.structure(rebuilt) == jax.tree.structure(pure)
  assert 0 in rebuilt["blocks"]


def test_params_of_leaves_plain_trees_alone():
  tree = {"params": jnp.ones(3)}  # a leaf named params is not a collection
  assert params_of(tree) is tree


def test_map_with_path_sees_paths(linen_variables):
  seen = []
  map_with_path(lambda p, x: seen.append(p) or x, linen_variables)
  assert seen == list(flatten(linen_variables))
