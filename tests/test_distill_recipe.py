"""The `distill` and `factorize` recipe stages, and the distill -> prune -> quantize -> export
chain through recipes and the Python API."""

import json

import jax
import numpy as np
import optax
import pytest

import jaxshrink.distill.stage  # noqa: F401  (registers `distill`)
import jaxshrink.lowrank.stage  # noqa: F401  (registers `factorize`)
import jaxshrink.quant.stage  # noqa: F401  (registers `quantize`)
import jaxshrink.sparsity.stage  # noqa: F401  (registers `prune`)
from jaxshrink import data, export, models
from jaxshrink.cli import main
from jaxshrink.distill import DistillLoss, distill
from jaxshrink.distill.models import digits_student, digits_student_nnx
from jaxshrink.encoding import materialize
from jaxshrink.errors import UsageError
from jaxshrink.evaluation import evaluate_tree
from jaxshrink.lowrank import LowRank
from jaxshrink.recipes import parse_recipe, run_recipe
from jaxshrink.sparsity import wrapper

STUDENT = "digits-student"


@pytest.fixture(scope="module")
def digits():
  return data.get_dataset("digits")


@pytest.fixture(scope="module")
def teacher():
  model = models.get_model("digits-cnn")
  return model, models.pretrained(model, progress=False)


def test_recipe_distill_factorize_export(tmp_path, teacher, capsys):
  recipe = parse_recipe({
    "model": "digits-cnn",
    "stages": [
      {"distill": {"student": STUDENT, "steps": 200, "temperature": 4.0, "alpha": 0.9}},
      {"factorize": {"target": "hidden/kernel", "rank": 16, "finetune_steps": 100,
                     "quantize_factors": 8}},
      {"cast": {"target": ".*", "dtype": "bfloat16"}},
    ],
  })  # fmt: skip
  result = run_recipe(recipe, progress=False)
  pipe = result.pipeline
  assert pipe.model.name == "digits-student" and pipe.float_model.name == "digits-cnn"
  kernel = pipe.tree["hidden"]["kernel"]
  assert isinstance(kernel, LowRank) and kernel.rank == 16 and kernel.a.name == "qarray"
  assert result.metrics["value"] > 0.9 and result.metrics["reference_value"] > 0.97
  assert result.report.total_bytes < 0.1 * models_size(teacher[1])
  # The baseline of "x smaller" is the teacher's float32 size, not the student's own.
  assert result.metrics["float_model_bytes"] == models_size(teacher[1])
  assert result.metrics["ratio_vs_float_model"] > 10 > result.report.ratio
  assert pipe.model_source == STUDENT
  export.save(tmp_path / "student", pipe.tree, model=pipe.model_source, data="digits",
              recipe=recipe.raw)  # fmt: skip
  loaded = export.load(tmp_path / "student")
  assert evaluate_tree(pipe.model, loaded, pipe.dataset) == result.metrics["value"]
  # The student is a zoo model, so the CLI rebuilds it from the checkpoint with no --model.
  assert main(["eval", str(tmp_path / "student"), "--json"]) == 0
  payload = json.loads(capsys.readouterr().out)
  assert payload["model"] == STUDENT
  assert payload["value"] == pytest.approx(result.metrics["value"], abs=1e-6)


def models_size(params):
  return sum(leaf.size * 4 for leaf in jax.tree.leaves(params))


def test_factorize_half_of_dense1_with_finetuning_stays_within_one_point():
  recipe = parse_recipe({
    "model": "digits-cnn",
    "stages": [{"factorize": {"target": "dense1/kernel", "budget": 0.5, "finetune_steps": 150}}],
  })  # fmt: skip
  result = run_recipe(recipe, progress=False)
  kernel = result.pipeline.tree["dense1"]["kernel"]
  assert kernel.rank * (1024 + 128) <= 1024 * 128 // 2
  assert result.metrics["value"] >= result.metrics["reference_value"] - 0.01


def test_nnx_teacher_and_student_in_a_recipe():
  recipe = parse_recipe({
    "model": "digits-cnn-nnx",
    "stages": [
      {"distill": {"student": "jaxshrink.distill.models:digits_student_nnx", "steps": 100,
                   "losses": {"kd": 1.0, "logit_mse": 0.01}}},
      {"factorize": {"target": "hidden/kernel", "energy": 0.9}},
    ],
  })  # fmt: skip
  result = run_recipe(recipe, progress=False)
  assert result.pipeline.model.framework == "nnx"
  assert isinstance(result.pipeline.tree["hidden"]["kernel"], LowRank)
  assert result.metrics["value"] > 0.8


def test_python_api_distill_prune_quantize_export(tmp_path, teacher, digits):
  from jaxshrink.quant import QuantSpec, quantize
  from jaxshrink.sparsity.allocation import Pruner
  from jaxshrink.tree import map_selected

  model, params = teacher
  for student in (digits_student(), digits_student_nnx()):
    tx = wrapper.pruning(optax.adam(3e-3), Pruner(".*hidden/kernel", sparsity=0.5))
    sp = distill(student, model.apply, params, digits, steps=100, optimizer=tx,
                 loss=DistillLoss(temperature=4.0, alpha=0.9))  # fmt: skip
    kernel = np.asarray(sp["hidden"]["kernel"])
    assert np.sum(kernel == 0) == kernel.size // 2
    ctree = map_selected(lambda p, w: quantize(w, QuantSpec(bits=8), path=p), sp, ".*kernel")
    export.save(tmp_path / student.name, ctree, model=student.name)
    loaded = export.load(tmp_path / student.name)
    assert evaluate_tree(student, loaded, digits) > 0.85


@pytest.mark.parametrize(
  ("options", "match"),
  [
    ({"student": STUDENT, "temperature": 0.0}, "`temperature` must be > 0"),
    ({"student": STUDENT, "alpha": 2.0}, r"`alpha`.*\[0, 1\]"),
    ({"student": STUDENT, "losses": {"kl": 1.0}}, "Unknown loss `kl`.*valid: kd"),
    ({"student": STUDENT, "losses": {"kd": -1}}, "weight >= 0"),
    ({"student": STUDENT, "steps": 0}, "positive int"),
  ],
)
def test_distill_stage_bad_options(options, match, teacher):
  recipe = parse_recipe({"model": "digits-cnn", "stages": [{"distill": options}]})
  with pytest.raises(UsageError, match=match):
    run_recipe(recipe, progress=False)


def test_distill_stage_needs_student_and_factorize_needs_one_rank_rule(teacher):
  with pytest.raises(UsageError, match="needs the option `student`"):
    parse_recipe({"model": "digits-cnn", "stages": [{"distill": {}}]})
  for options in ({}, {"rank": 4, "budget": 0.5}):
    recipe = parse_recipe({"model": "digits-cnn", "stages": [{"factorize": options}]})
    with pytest.raises(UsageError, match="exactly one of `rank`, `energy` or `budget`"):
      run_recipe(recipe, progress=False)
  recipe = parse_recipe({"model": "digits-cnn", "stages": [{"factorize": {"rank": 999}}]})
  with pytest.raises(ValueError, match=r"`rank`=999 exceeds min\(dims\)"):
    run_recipe(recipe, progress=False)


def test_recipe_distill_prune_quantize_export(tmp_path):
  recipe = parse_recipe({
    "model": "digits-cnn",
    "stages": [
      {"distill": {"student": STUDENT, "steps": 200}},
      {"prune": {"target": "hidden/kernel", "method": "oneshot", "sparsity": 0.5}},
      {"quantize": {"target": "out/kernel", "weight_bits": 8}},
    ],
  })  # fmt: skip
  result = run_recipe(recipe, progress=False)
  tree = result.pipeline.tree
  hidden = np.asarray(materialize(tree["hidden"]["kernel"]))
  assert np.sum(hidden == 0) == hidden.size // 2
  assert tree["out"]["kernel"].name == "qarray"
  export.save(tmp_path / "chain", tree, model=STUDENT, data="digits")
  loaded = export.load(tmp_path / "chain")
  assert (
    evaluate_tree(result.pipeline.model, loaded, result.pipeline.dataset)
    == (result.metrics["value"])
  )
  assert result.metrics["value"] > 0.85
