"""Every ordered pair of stage kinds and methods on digits-cnn: it works end to end (export,
reload, evaluate, earlier zeros kept) or it is refused with a usage error naming both stages.

Each first stage runs once (module cache); the second stage runs on a copy of its pipeline.
Steps are cut to the minimum: the test checks composition, the `hybrids` benchmark accuracy.
"""

from pathlib import Path

import numpy as np
import pytest

from jaxshrink import export
from jaxshrink.compose import CompositionError
from jaxshrink.encoding import is_encoding, materialize
from jaxshrink.errors import UsageError
from jaxshrink.evaluation import evaluate_tree
from jaxshrink.recipes import parse_recipe, prepare, run_recipe, run_stages
from jaxshrink.tree import flatten

Q4 = {"weight_bits": 4, "group_size": 32, "calibration_batches": 1}
VARIANTS = {
  "prune-oneshot": {"prune": {"sparsity": 0.5, "method": "oneshot"}},
  "prune-wanda": {"prune": {"sparsity": 0.5, "method": "wanda", "calibration_batches": 1}},
  "prune-sparsegpt": {"prune": {"sparsity": 0.5, "method": "sparsegpt", "calibration_batches": 1}},
  "prune-2:4": {"prune": {"structure": "2:4", "method": "oneshot"}},
  "prune-gradual": {"prune": {"sparsity": 0.5, "method": "gradual", "steps": 4}},
  "quantize-rtn": {"quantize": {"weight_bits": 4, "group_size": 32}},
  "quantize-gptq": {"quantize": {**Q4, "method": "gptq"}},
  "quantize-awq": {"quantize": {**Q4, "method": "awq", "grid": 4}},
  "quantize-w8a8": {"quantize": {"activation_bits": 8, "calibration_batches": 1}},
  "quantize-smoothquant": {
    "quantize": {"activation_bits": 8, "method": "smoothquant", "calibration_batches": 1}
  },
  "quantize-qat": {"quantize": {"method": "qat", "steps": 4}},
  "factorize": {"factorize": {"budget": 0.5}},
  "distill": {"distill": {"student": "digits-student", "steps": 4}},
  "cast": {"cast": {}},
}
KIND = {name: next(iter(stage)) for name, stage in VARIANTS.items()}
ACTIVATIONS = {"quantize-awq", "quantize-w8a8", "quantize-smoothquant", "quantize-qat"}


def refused(first: str, second: str) -> bool:
  """The orders that would throw away the first stage's work (`jaxshrink.compose`)."""
  a, b = KIND[first], KIND[second]
  if a == "cast" or b == "cast" or a == "distill":
    return False  # cast is storage only; a distilled student is a float model
  if b == "distill":
    return True  # a new student would discard the compression: `recover` does that job
  if a == "quantize":
    return b in ("prune", "quantize", "factorize")
  if a == "factorize":
    return b in ("prune", "factorize") or second in ACTIVATIONS
  return b == "factorize"  # a == "prune": SVD factors of a sparse kernel are dense


@pytest.fixture(scope="module")
def start():
  return prepare(parse_recipe({"model": "digits-cnn", "stages": []}), progress=False)


_FIRST: dict[str, object] = {}


def _stage(pipeline, name):
  recipe = parse_recipe({"model": "digits-cnn", "stages": [VARIANTS[name]]})
  return run_stages(recipe, pipeline)


def _first(start, name):
  if name not in _FIRST:
    _FIRST[name] = _stage(start, name)
  return _FIRST[name]


def _zeros(tree) -> dict[str, np.ndarray]:
  """`{path: pruned positions}` of the pruned (bitmask / N:M) leaves."""
  return {
    p: np.asarray(leaf.materialize()) == 0
    for p, leaf in flatten(tree).items()
    if is_encoding(leaf) and leaf.name in ("bitmask", "nm")
  }


@pytest.mark.parametrize("second", list(VARIANTS))
@pytest.mark.parametrize("first", list(VARIANTS))
def test_stage_pair_composes_or_is_refused(start, first, second, tmp_path):
  before = _first(start, first)
  if refused(first, second):
    with pytest.raises(CompositionError) as err:
      _stage(before, second)
    message = str(err.value)
    assert f"`{KIND[second]}` cannot run after `{KIND[first]}`" in message, message
    return
  after = _stage(before, second)
  if KIND[second] != "distill":
    dense = flatten(materialize(after.tree))
    for path, pruned in _zeros(before.tree).items():
      assert not np.any(np.asarray(dense[path])[pruned]), (path, "lost its pruned zeros")
  export.save(tmp_path / "ckpt", after.tree)
  loaded = export.load(tmp_path / "ckpt")
  value = evaluate_tree(after.model, after.tree, after.dataset)
  assert evaluate_tree(after.model, loaded, after.dataset) == pytest.approx(value, abs=1e-6)
  if "distill" not in (first, second):
    assert value >= 0.9, value  # a few steps of anything keeps digits-cnn working


def test_prune_then_gptq_keeps_every_zero_and_quantizes_the_rest(start):
  pruned = _first(start, "prune-sparsegpt")
  quantized = _stage(pruned, "quantize-gptq")
  flat = flatten(quantized.tree)
  for path, zeros in _zeros(pruned.tree).items():
    assert flat[path].name == "qarray"
    codes = np.asarray(materialize(flat[path]))
    assert np.all(codes[zeros] == 0) and np.mean(codes[~zeros] == 0) < 0.2


def test_factorize_then_gptq_quantizes_the_factors(start):
  factored = _first(start, "factorize")
  quantized = _stage(factored, "quantize-gptq")
  for path, leaf in flatten(factored.tree).items():
    if is_encoding(leaf) and leaf.name == "lowrank":
      out = flatten(quantized.tree)[path]
      assert out.name == "lowrank" and out.rank == leaf.rank
      assert out.a.name == "qarray" and out.b.name == "qarray" and out.a.bits == 4


def test_cast_leaves_stay_cast_through_a_later_stage(start):
  cast = _first(start, "cast")
  pruned = _stage(cast, "prune-oneshot")
  names = {p: getattr(leaf, "name", None) for p, leaf in flatten(pruned.tree).items()}
  assert names["conv1/bias"] == "cast" and names["conv2/kernel"] == "bitmask"


def test_quantize_after_factorize_with_activations_names_both_stages_and_the_fix(start):
  with pytest.raises(CompositionError, match=r"after `factorize`.*weight-only.*rtn.*gptq"):
    _stage(_first(start, "factorize"), "quantize-w8a8")


def test_joint_sparsegpt_quantizes_the_kept_weights_in_one_pass(start):
  stage = {"prune": {"method": "sparsegpt", "structure": "2:4", "weight_bits": 4,
                     "group_size": 32, "calibration_batches": 1}}  # fmt: skip
  joint = run_stages(parse_recipe({"model": "digits-cnn", "stages": [stage]}), start)
  flat = flatten(joint.tree)
  for path in ("conv2/kernel", "dense1/kernel"):
    assert flat[path].name == "qarray" and flat[path].bits == 4
    w = np.moveaxis(np.asarray(materialize(flat[path])), -2, 0)  # 2:4 along the input axis
    groups = (w.reshape(w.shape[0] // 4, 4, -1) != 0).sum(axis=1)
    assert groups.max() <= 2
  assert evaluate_tree(joint.model, joint.tree, joint.dataset) >= 0.95


@pytest.mark.parametrize(
  ("options", "match"),
  [
    ({"method": "oneshot", "weight_bits": 4}, r"weight_bits: 4.*needs `method: sparsegpt`"),
    ({"method": "sparsegpt", "group_size": 32}, r"`group_size` of `prune`.*needs `weight_bits`"),
    ({"method": "sparsegpt", "weight_bits": 1}, r"weight_bits"),
  ],
)
def test_joint_keys_are_refused_where_they_cannot_apply(start, options, match):
  recipe = parse_recipe({"model": "digits-cnn", "stages": [{"prune": options}]})
  with pytest.raises(UsageError, match=match):
    run_stages(recipe, start)


# --- a user's own linen ResNet (BatchNorm, residual adds), loaded from `module:factory` ---

FIXTURES = Path(__file__).parent / "fixtures"
USER_PAIRS = {
  "oneshot 50% -> gptq int4 g32": [
    {"prune": {"method": "oneshot", "sparsity": 0.5}},
    {"quantize": {"method": "gptq", "weight_bits": 4, "group_size": 32}},
  ],
  "sparsegpt 50% -> W8A8": [
    {"prune": {"method": "sparsegpt", "sparsity": 0.5}},
    {"quantize": {"activation_bits": 8}},
  ],
  "factorize 0.5 -> gptq int4 g32": [
    {"factorize": {"budget": 0.5}},
    {"quantize": {"method": "gptq", "weight_bits": 4, "group_size": 32}},
  ],
}


@pytest.mark.parametrize("name", list(USER_PAIRS))
def test_user_resnet_hybrids_run_export_and_reload(name, monkeypatch, tmp_path):
  monkeypatch.syspath_prepend(str(FIXTURES))
  recipe = parse_recipe({
    "model": "user_models:linen_resnet", "data": "user_models:resnet_data",
    "stages": USER_PAIRS[name], "export": {"serving": None},
  })  # fmt: skip
  result = run_recipe(recipe, progress=False)
  pipeline = result.pipeline
  assert result.metrics["reference_value"] == 1.0
  assert result.metrics["value"] >= 0.85, result.metrics
  export.save(tmp_path / "ckpt", pipeline.tree)
  loaded = export.load(tmp_path / "ckpt")
  assert evaluate_tree(pipeline.model, loaded, pipeline.dataset) == pytest.approx(
    result.metrics["value"], abs=1e-6
  )
  assert result.report.ratio > 2.5


def test_user_resnet_factorize_then_w8a8_names_both_stages(monkeypatch):
  monkeypatch.syspath_prepend(str(FIXTURES))
  recipe = parse_recipe({
    "model": "user_models:linen_resnet", "data": "user_models:resnet_data",
    "stages": [{"factorize": {"budget": 0.5}}, {"quantize": {"activation_bits": 8}}],
  })  # fmt: skip
  with pytest.raises(CompositionError, match=r"`quantize` cannot run after `factorize`"):
    run_recipe(recipe, progress=False)
