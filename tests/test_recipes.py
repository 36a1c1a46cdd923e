"""Recipe parsing and validation errors (no model is loaded here)."""

from pathlib import Path

import pytest

from jaxshrink import UsageError
from jaxshrink.recipes import load_recipe, parse_recipe, stage_kinds


def test_minimal_recipe_gets_defaults():
  recipe = parse_recipe({"model": "digits-cnn"})
  assert recipe.model == "digits-cnn"
  assert recipe.params is None and recipe.data is None and recipe.seed == 0
  assert recipe.stages == () and recipe.export == {"evaluate": True, "serving": "auto"}


def test_stage_options_are_filled():
  recipe = parse_recipe({"model": "m", "stages": [{"cast": {"dtype": "float16"}}, "cast"]})
  (kind1, opts1), (kind2, opts2) = recipe.stages
  assert kind1 == kind2 == "cast"
  assert opts1 == {
    "target": ".*",
    "exclude": None,
    "min_ndim": 0,
    "min_size": 0,
    "dtype": "float16",
  }
  assert opts2["dtype"] == "bfloat16"


def test_builtin_stage_kinds_have_docs():
  kinds = stage_kinds()
  assert "cast" in kinds
  assert all(kind.doc for kind in kinds.values())


@pytest.mark.parametrize(
  ("raw", "match"),
  [
    ({"model": "m", "stages": [{"quantise": {}}]}, r"Unknown stage `quantise` \(stage 1\).*valid"),
    ({"model": "m", "stages": [{"cats": {}}]}, r"Unknown stage `cats`.*Did you mean `cast`"),
    (
      {"model": "m", "stages": [{"cast": {"dtyp": "bfloat16"}}]},
      r"Unknown option `dtyp` in stage 1 \(`cast`\).*valid options: dtype, exclude",
    ),
    ({"model": "m", "stages": [{"cast": {"min_ndim": "two"}}]}, r"`min_ndim`.*must be int"),
    ({"model": "m", "stages": [{"cast": {}, "prune": {}}]}, "one stage kind"),
    ({"model": "m", "stages": {"cast": {}}}, "Key `stages` in recipe must be list"),
    ({"model": "m", "stage": []}, r"Unknown key `stage`.*Did you mean `stages`"),
    ({"stages": []}, "needs the key `model`"),
    ({"model": 3}, "`model` in recipe must be a string"),
    ({"model": "m", "export": {"fmt": 1}}, r"Unknown option `fmt` in `export`"),
    (["model"], "must be a mapping"),
  ],
)
def test_validation_errors(raw, match):
  with pytest.raises(UsageError, match=match):
    parse_recipe(raw)


def test_load_recipe_file(tmp_path):
  path = tmp_path / "r.yaml"
  path.write_text("model: digits-cnn\nstages:\n  - cast: {dtype: float16}\nexport: {}\n")
  recipe = load_recipe(path)
  assert recipe.stages[0][1]["dtype"] == "float16"
  assert recipe.raw["model"] == "digits-cnn"


def test_load_recipe_errors(tmp_path):
  with pytest.raises(UsageError, match="does not exist"):
    load_recipe(tmp_path / "nope.yaml")
  bad = tmp_path / "bad.yaml"
  bad.write_text("model: [unclosed\n")
  with pytest.raises(UsageError, match="not valid YAML"):
    load_recipe(bad)
  typo = tmp_path / "typo.yaml"
  typo.write_text("model: digits-cnn\nstages:\n  - qantize: {}\n")
  with pytest.raises(UsageError, match=f"Unknown stage `qantize`.*in `{typo}`"):
    load_recipe(typo)


EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_recipe_loads(path):
  """The shipped recipes parse: known stages, known option keys, a model named."""
  recipe = load_recipe(path)
  assert recipe.model and (recipe.stages or path.name.endswith("-float.yaml"))
  assert {kind for kind, _ in recipe.stages} <= set(stage_kinds())
