"""Criteria, structures, allocation and schedules: exact masks, properties, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxshrink.sparsity import (
  NM,
  Block,
  Channel,
  Heads,
  Pruner,
  Schedule,
  apply_masks,
  check_masks,
  constant_schedule,
  erk_sparsities,
  keep_top,
  mask_sparsity,
  nm_mask,
  one_shot_schedule,
  periodic_schedule,
  polynomial_schedule,
  score_leaf,
  wanda_scores,
)
from jaxshrink.tree import Rule, flatten


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "conv": {
      "kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
      "bias": np.ones(8, np.float32),
    },
    "dense": {
      "kernel": rng.normal(size=(32, 16)).astype(np.float32),
      "bias": np.ones(16, np.float32),
    },
    "head": {"kernel": rng.normal(size=(16, 4)).astype(np.float32), "bias": np.ones(4, np.float32)},
  }


def test_keep_top_exact_under_jit():
  scores = jnp.array([0.1, 5.0, 3.0, 3.0, -1.0])
  keep = jax.jit(keep_top)(scores, jnp.int32(3))
  assert keep.tolist() == [False, True, True, True, False]
  assert keep.dtype == jnp.bool_


_KEEP_TOP = jax.jit(keep_top)


@settings(max_examples=40, deadline=None)
@given(
  shape=st.sampled_from([(1,), (7,), (5, 6), (3, 4, 5)]),
  values=st.sampled_from(["normal", "ties", "signed_zeros", "neg_inf"]),
  seed=st.integers(0, 10_000),
  extra=st.integers(-1, 2),
)
def test_keep_top_equals_a_stable_sort_on_nd_scores(shape, values, seed, extra):
  # keep_top counts against a threshold instead of sorting (no gather on a mesh); it must
  # pick exactly what a stable descending argsort of the raveled scores picks.
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32)
  if values == "ties":
    x = np.round(x)
  elif values == "signed_zeros":
    x = np.round(x) * 0.0 * np.sign(rng.normal(size=shape)) + np.round(x)
  elif values == "neg_inf":
    x[rng.random(shape) < 0.3] = -np.inf
  n = int(rng.integers(0, x.size + 1)) + extra
  order = np.argsort(-np.where(x == 0, 0.0, x).ravel(), kind="stable")
  want = np.zeros(x.size, bool)
  want[order[: max(n, 0)]] = True
  got = np.asarray(_KEEP_TOP(jnp.asarray(x), jnp.int32(n)))
  assert got.shape == shape
  np.testing.assert_array_equal(got.ravel(), want)


@settings(max_examples=12, deadline=None)
@given(
  n=st.integers(1, 4),
  m=st.sampled_from([4, 8]),
  rows=st.just(3),
  seed=st.integers(0, 1000),
)
def test_nm_mask_exact_in_every_group(n, m, rows, seed):
  if n > m:
    return
  w = np.random.default_rng(seed).normal(size=(rows * m, 3)).astype(np.float32)
  keep = np.asarray(nm_mask(jnp.abs(w), n, m, axis=0))
  groups = keep.reshape(rows, m, 3)
  assert (groups.sum(axis=1) == n).all()
  # The kept entries are the n largest of each group.
  mags = np.abs(w).reshape(rows, m, 3)
  kept_min = np.where(groups, mags, np.inf).min(axis=1)
  dropped_max = np.where(groups, -np.inf, mags).max(axis=1)
  assert (kept_min >= dropped_max).all()


_HALF = jax.jit(lambda p, f: Pruner(".*kernel", 0.5).masks(p, f))


@settings(max_examples=20, deadline=None)
@given(percent=st.integers(0, 99), seed=st.integers(0, 100))
def test_unstructured_density_matches_target(percent, seed):
  # One compiled function: the schedule's traced fraction scales the final 0.5 sparsity.
  masks = _HALF(_params(seed), jnp.float32(percent / 50))
  for path, mask in flatten(masks).items():
    if mask.ndim:
      pruned = int((~mask).sum())
      assert abs(pruned - percent / 100 * mask.size) <= 0.5 + 1e-6, path


def test_magnitude_mask_matches_numpy_reference():
  params = _params()
  masks = Pruner("dense/kernel", 0.75).masks(params)
  w = params["dense"]["kernel"]
  threshold = np.sort(np.abs(w).ravel())[int(0.75 * w.size)]
  np.testing.assert_array_equal(np.asarray(masks["dense"]["kernel"]), np.abs(w) >= threshold)
  assert masks["dense"]["bias"].shape == ()


def test_criteria_values():
  w = jnp.array([[1.0, -2.0], [3.0, 0.5]])
  g = jnp.array([[2.0, 1.0], [0.0, 4.0]])
  np.testing.assert_allclose(score_leaf("saliency", w, grad=g), [[2.0, 2.0], [0.0, 2.0]])
  norm = jnp.array([10.0, 1.0])
  np.testing.assert_allclose(wanda_scores(w, norm), [[10.0, 20.0], [3.0, 0.5]])
  r1 = score_leaf("random", w, key=jax.random.key(0))
  r2 = score_leaf("random", w, key=jax.random.key(0))
  assert np.array_equal(r1, r2)


def test_channel_mask_and_bias_follows():
  params = _params()
  masks = Pruner("dense/kernel", 0.5, structure=Channel(-1)).masks(params)
  kernel, bias = np.asarray(masks["dense"]["kernel"]), np.asarray(masks["dense"]["bias"])
  assert (kernel.all(axis=0) | ~kernel.any(axis=0)).all()  # whole columns
  np.testing.assert_array_equal(kernel[0], bias)
  assert int(bias.sum()) == 8
  norms = np.abs(params["dense"]["kernel"]).sum(axis=0)
  np.testing.assert_array_equal(bias, norms >= np.sort(norms)[8])


def test_input_channel_and_block_masks():
  params = _params()
  masks = Pruner("dense/kernel", 0.25, structure=Channel(-2)).masks(params)
  rows = np.asarray(masks["dense"]["kernel"]).all(axis=1)
  assert rows.sum() == 24 and masks["dense"]["bias"].shape == ()
  masks = Pruner("dense/kernel", 0.5, structure=Block(4, 4)).masks(params)
  tiles = np.asarray(masks["dense"]["kernel"]).reshape(8, 4, 4, 4)
  assert (tiles.all(axis=(1, 3)) | ~tiles.any(axis=(1, 3))).all()
  assert tiles.all(axis=(1, 3)).sum() == 16


def test_head_masks_prune_whole_heads_consistently():
  rng = np.random.default_rng(0)
  attn = {
    name: {"kernel": rng.normal(size=(8, 8)).astype(np.float32), "bias": np.ones(8, np.float32)}
    for name in ("query", "key", "value", "out")
  }
  params = {"block_0": {"attention": attn}}
  masks = Pruner(".*attention/.*/kernel", 0.5, structure=Heads(4)).masks(params)
  a = masks["block_0"]["attention"]
  heads_q = np.asarray(a["query"]["kernel"]).reshape(8, 4, 2).all(axis=(0, 2))
  for name in ("key", "value"):
    np.testing.assert_array_equal(
      np.asarray(a[name]["kernel"]).reshape(8, 4, 2).all(axis=(0, 2)), heads_q
    )
    np.testing.assert_array_equal(np.asarray(a[name]["bias"]).reshape(4, 2).all(axis=1), heads_q)
  np.testing.assert_array_equal(
    np.asarray(a["out"]["kernel"]).reshape(4, 2, 8).all(axis=(1, 2)), heads_q
  )
  assert heads_q.sum() == 2 and a["out"]["bias"].shape == ()


def test_global_and_erk_allocation():
  params = _params()
  rule = Rule(".*kernel")
  masks = jax.jit(Pruner(rule, 0.8, allocation="global").masks)(params)
  sp = mask_sparsity(masks)
  total = sum(np.size(params[k]["kernel"]) for k in params)
  pruned = sum(sp[f"{k}/kernel"] * np.size(params[k]["kernel"]) for k in params)
  assert abs(pruned / total - 0.8) < 1e-3
  shapes = {k: params[k]["kernel"].shape for k in params}
  erk = erk_sparsities(shapes, 0.8)
  kept = sum((1 - erk[k]) * np.prod(shapes[k]) for k in shapes)
  assert abs(kept / total - 0.2) < 1e-6
  assert erk["head"] < erk["dense"]  # small layers stay denser
  masks = jax.jit(Pruner(rule, 0.8, allocation="erk").masks)(params)
  assert abs(mask_sparsity(masks)["conv/kernel"] - erk["conv"]) < 2e-3


def test_overrides_and_exclusions():
  params = _params()
  pruner = Pruner(Rule(".*kernel", exclude="conv/kernel"), 0.9, overrides={"head/kernel": 0.0})
  masks = pruner.masks(params)
  assert masks["conv"]["kernel"].shape == ()
  assert bool(masks["head"]["kernel"].all())
  assert abs(mask_sparsity(masks)["dense/kernel"] - 0.9) < 1e-3
  pruned = apply_masks(params, masks)
  assert float((pruned["dense"]["kernel"] == 0).mean()) == pytest.approx(0.9, abs=1e-3)


def test_schedules():
  poly = polynomial_schedule(begin=10, end=110, frequency=10)
  assert float(poly.fraction(0)) == 0.0
  assert float(poly.fraction(60)) == pytest.approx(1 - 0.5**3)
  assert float(poly.fraction(65)) == pytest.approx(1 - 0.5**3)  # held between updates
  assert float(poly.fraction(500)) == 1.0
  assert [bool(poly.is_update(s)) for s in (9, 10, 15, 20, 110, 120)] == [
    False,
    True,
    False,
    True,
    True,
    False,
  ]
  one = one_shot_schedule(5)
  assert [bool(one.is_update(s)) for s in (4, 5, 6)] == [False, True, False]
  assert float(one.fraction(4)) == 0.0 and float(one.fraction(6)) == 1.0
  const = constant_schedule(begin=0, end=20, frequency=10)
  assert [bool(const.is_update(s)) for s in (0, 10, 20, 30)] == [True, True, True, False]
  per = periodic_schedule(begin=0, end=30, frequency=10)
  assert [float(per.fraction(s)) for s in (0, 10, 20, 30)] == [0.25, 0.5, 0.75, 1.0]
  jitted = jax.jit(poly.fraction)(jnp.int32(60))
  assert float(jitted) == pytest.approx(0.875)


# ---- bad input, each with the message that names the fix ----


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_sparsity_outside_range(bad):
  with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\).*Use e.g. 0.9"):
    Pruner(".*kernel", bad)
  with pytest.raises(ValueError, match=r"`overrides\['dense'\]` must be in \[0, 1\)"):
    Pruner(".*kernel", 0.5, overrides={"dense": bad})


def test_nm_errors():
  with pytest.raises(
    ValueError, match=r"`d/kernel`.shape\[-2\] divisible by M=4.*Exclude the leaf"
  ):
    Pruner(".*kernel", structure="2:4").masks({"d": {"kernel": np.ones((6, 4), np.float32)}})
  with pytest.raises(ValueError, match="0 < N <= M.*got N=5, M=4. Write e.g. '2:4'"):
    NM(5, 4)
  with pytest.raises(ValueError, match="0 < N <= M"):
    Pruner(".*kernel", structure="5:4")


def test_unknown_criterion_structure_allocation():
  with pytest.raises(ValueError, match=r"Unknown criterion 'size'; expected one of \['magnitude'"):
    Pruner(".*kernel", criterion="size")
  with pytest.raises(ValueError, match="Unknown structure 'rows'; expected one of unstructured"):
    Pruner(".*kernel", structure="rows")
  with pytest.raises(ValueError, match="Unknown allocation 'local'"):
    Pruner(".*kernel", allocation="local")


def test_mask_tree_mismatch():
  params = _params()
  masks = Pruner(".*kernel", 0.5).masks(params)
  del masks["head"]
  with pytest.raises(
    ValueError, match=r"missing masks for \['head/bias', 'head/kernel'\].*Pruner.masks\(params\)"
  ):
    check_masks(params, masks)
  masks = Pruner(".*kernel", 0.5).masks(params)
  masks["dense"]["kernel"] = masks["dense"]["kernel"].astype(jnp.float32)
  with pytest.raises(ValueError, match="Mask for `dense/kernel` must be bool"):
    apply_masks(params, masks)


def test_schedule_end_before_begin():
  with pytest.raises(
    ValueError, match=r"`end` \(5\) comes before `begin` \(10\); set end >= begin"
  ):
    polynomial_schedule(begin=10, end=5)
  with pytest.raises(ValueError, match="frequency"):
    Schedule("constant", 0, None, 0)


def test_channel_pruning_of_bias():
  # A rule selects 2-D and larger leaves by default: the bias is not scored, only follows its
  # kernel's channels. Selecting it on purpose (min_ndim=0) is refused.
  masks = flatten(Pruner("dense/.*", 0.5, structure="channel").masks(_params()))
  kept = np.asarray(masks["dense/kernel"]).any(axis=0)
  np.testing.assert_array_equal(np.asarray(masks["dense/bias"]), kept)
  with pytest.raises(ValueError, match="`dense/bias` has shape \\(16,\\).*'.\\*kernel'"):
    Pruner(Rule("dense/.*", min_ndim=0), 0.5, structure="channel").masks(_params())
