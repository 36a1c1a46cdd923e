"""The `prune` stage's defaults: the shortest recipes work on digits-cnn, and say what they kept.

`{prune: {sparsity: 0.9, method: gradual}}` used to prune digits-cnn's 288-weight first conv to
90% and lose 22 of the 360 test images. Kernels under `keep_dense_below` (4096) weights now stay
dense, the others prune more so the selected kernels are still 90% zeros, and the stage's log
entry (the manifest's `metrics.stages`) names each kernel kept dense with the reason.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshrink import export, models
from jaxshrink.recipes import parse_recipe, run_recipe
from jaxshrink.sparsity import BitmaskSparse, NMSparse, Pruner
from jaxshrink.sparsity.allocation import DEFAULT_KEEP_DENSE_BELOW
from jaxshrink.sparsity.stage import PRUNE_OPTIONS
from jaxshrink.tree import Rule, flatten

KEPT = {
  "conv1/kernel": "kept dense (288 weights < keep_dense_below 4096)",
  "dense2/kernel": "kept dense (1280 weights < keep_dense_below 4096)",
}
# digits-cnn's selected kernels: 288 + 18,432 + 131,072 + 1,280 weights.
SELECTED = 151_072
PRUNED = SELECTED - 288 - 1280


def _shortest(stage: dict) -> object:
  recipe = {"model": "digits-cnn", "stages": [{"prune": stage}], "export": {"serving": None}}
  return run_recipe(parse_recipe(recipe), progress=False)


def _pruned_entry(metrics: dict) -> dict:
  (entry,) = [e["pruned"] for e in metrics["stages"] if "pruned" in e]
  return entry


@pytest.fixture(scope="module")
def gradual90():
  return _shortest({"sparsity": 0.9, "method": "gradual"})


def test_shortest_gradual_90_loses_at_most_three_images(gradual90):
  metrics = gradual90.metrics
  images = len(gradual90.pipeline.dataset.y_test)
  assert images == 360
  lost = round((metrics["reference_value"] - metrics["value"]) * images)
  assert lost <= 3, (metrics["value"], metrics["reference_value"])


def test_shortest_gradual_90_reports_what_stayed_dense(gradual90):
  report = _pruned_entry(gradual90.metrics)
  assert report["kept_dense"] == KEPT
  assert report["requested"] == 0.9
  # The total over the selected kernels is the requested one: the large kernels make up for
  # the dense ones (0.9 * 151072 / 149504 = 0.90944 each).
  assert report["sparsity"] == pytest.approx(0.9, abs=1e-5)
  assert report["pruned_leaves_sparsity"] == pytest.approx(0.9 * SELECTED / PRUNED, abs=1e-5)
  assert report["layers"]["conv1/kernel"] == report["layers"]["dense2/kernel"] == 0.0
  tree = gradual90.pipeline.tree
  for name in ("conv2", "dense1"):
    assert isinstance(tree[name]["kernel"], BitmaskSparse)
    assert report["layers"][f"{name}/kernel"] == pytest.approx(0.9094, abs=1e-3)
  for name in ("conv1", "dense2"):
    assert isinstance(tree[name]["kernel"], jax.Array)
    assert np.count_nonzero(np.asarray(tree[name]["kernel"]) == 0) == 0
  kernels = [leaf for leaf in gradual90.report.layers if leaf.path.endswith("kernel")]
  zeros = sum(leaf.sparsity * leaf.size for leaf in kernels)
  assert round(zeros) == round(0.9 * SELECTED)


def test_report_is_in_the_checkpoint_manifest(gradual90, tmp_path):
  out = export.save(tmp_path / "ckpt", gradual90.pipeline.tree, metrics=gradual90.metrics)
  manifest = export.read_manifest(out)
  assert _pruned_entry(manifest["metrics"])["kept_dense"] == KEPT
  (entry,) = manifest["metrics"]["stages"]  # one log entry per stage, the report merged in
  assert entry["stage"] == "prune" and "options" in entry and "seconds" in entry


def test_inspect_prints_what_stayed_dense_and_why(gradual90, tmp_path, capsys):
  from jaxshrink.cli import main

  out = export.save(tmp_path / "ckpt", gradual90.pipeline.tree, metrics=gradual90.metrics)
  assert main(["inspect", str(out)]) == 0
  lines = capsys.readouterr().out.splitlines()
  for path, reason in KEPT.items():
    assert f"{path}: {reason}" in lines


def test_shortest_two_four_runs_and_says_the_total_is_over_the_pruned_kernels():
  # conv1's one input channel cannot hold 2:4 groups; it is small, so it stays dense.
  result = _shortest({"structure": "2:4", "method": "oneshot"})
  report = _pruned_entry(result.metrics)
  assert report["kept_dense"] == KEPT
  assert report["pruned_leaves_sparsity"] == 0.5
  assert report["sparsity"] == pytest.approx(0.5 * PRUNED / SELECTED, abs=1e-6)
  tree = result.pipeline.tree
  assert isinstance(tree["conv2"]["kernel"], NMSparse)
  assert isinstance(tree["dense1"]["kernel"], NMSparse)
  assert isinstance(tree["conv1"]["kernel"], jax.Array)


def test_stage_default_is_4096():
  assert PRUNE_OPTIONS["keep_dense_below"] == DEFAULT_KEEP_DENSE_BELOW == 4096
  assert PRUNE_OPTIONS["allocation"] == "uniform"


def test_transformer_kernels_are_never_small():
  # Every tiny-lm kernel (the smallest 160x160) is pruned as before: no kernel kept dense.
  model = models.load_model("tiny-lm")
  shapes = {p: s.shape for p, s in flatten(jax.eval_shape(model.init, jax.random.key(0))).items()}
  pruner = Pruner(".*kernel", 0.5, keep_dense_below=DEFAULT_KEEP_DENSE_BELOW)
  assert pruner.small_leaves(shapes) == {}
  assert pruner.target_sparsity(shapes) == 0.5


def _toy():
  keys = jax.random.split(jax.random.key(0), 3)
  return {
    "first": {"kernel": jax.random.normal(keys[0], (3, 3, 1, 8)), "bias": jnp.zeros(8)},
    "mid": {"kernel": jax.random.normal(keys[1], (64, 64))},
    "head": {"kernel": jax.random.normal(keys[2], (64, 4))},
  }


@pytest.mark.parametrize("allocation", ["uniform", "global", "erk"])
def test_small_leaves_stay_dense_and_the_total_holds(allocation):
  params = _toy()
  pruner = Pruner(".*kernel", 0.5, allocation=allocation, keep_dense_below=1000)
  masks = jax.jit(pruner.masks)(params)
  assert masks["first"]["kernel"].shape == masks["head"]["kernel"].shape == ()
  assert bool(masks["first"]["kernel"]) and bool(masks["head"]["kernel"])
  # 72 + 4096 + 256 selected weights, 2212 zeros, all in `mid`.
  assert int(jnp.sum(~masks["mid"]["kernel"])) == 2212
  report = pruner.report(params, masks)
  assert report["kept_dense"] == {
    "first/kernel": "kept dense (72 weights < keep_dense_below 1000)",
    "head/kernel": "kept dense (256 weights < keep_dense_below 1000)",
  }
  assert report["sparsity"] == pytest.approx(2212 / 4424)
  assert pruner.target_sparsity({k: v.shape for k, v in flatten(params).items()}) == (
    pytest.approx(0.5 * 4424 / 4096)
  )


def test_report_names_every_reason():
  params = _toy()
  rule = Rule(".*kernel", exclude="first/kernel")
  pruner = Pruner(rule, 0.5, overrides={"head/kernel": 0.0})
  report = pruner.report(params, pruner.masks(params))
  assert report["kept_dense"] == {
    "first/kernel": "left alone (matches exclude 'first/kernel')",
    "head/kernel": "kept dense (overrides 'head/kernel': 0.0)",
  }
  assert report["layers"] == {"mid/kernel": 0.5, "head/kernel": 0.0}
  small = Pruner(Rule(".*kernel", min_size=100), 0.5)
  assert small.report(params, small.masks(params))["kept_dense"] == {
    "first/kernel": "left alone (72 weights < min_size 100)"
  }
  erk = Pruner(".*kernel", 0.5, allocation="erk")
  reason = "kept dense (erk: a layer this small would need a density above 1)"
  kept = erk.report(params, erk.masks(params))["kept_dense"]
  assert kept == {"first/kernel": reason, "head/kernel": reason}


def test_keep_dense_below_bad_values():
  params = _toy()
  for bad in (True, 1.5, "4096"):
    with pytest.raises(TypeError, match="`keep_dense_below` must be an int"):
      Pruner(".*kernel", 0.5, keep_dense_below=bad)
  with pytest.raises(ValueError, match="`keep_dense_below` must be a non-negative"):
    Pruner(".*kernel", 0.5, keep_dense_below=-1)
  with pytest.raises(ValueError, match="fewer than keep_dense_below=10000 weights"):
    Pruner(".*kernel", 0.5, keep_dense_below=10000).masks(params)
  with pytest.raises(ValueError, match="at most 100% can be pruned"):
    Pruner(".*kernel", 0.95, keep_dense_below=1000).masks(params)
  assert Pruner(".*kernel", 0.5, keep_dense_below=0).small_leaves({"a/kernel": (1, 1)}) == {}
