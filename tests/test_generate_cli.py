"""`jaxshrink generate`: text from a decoder checkpoint timed against float; usage errors."""

import json
from pathlib import Path

import pytest
import yaml

from jaxshrink.cli import main
from jaxshrink.recipes import parse_recipe

LM_RECIPE = """\
model: tiny-lm
stages:
  - quantize: {target: ".*kernel", weight_bits: 8}
export: {}
"""
DIGITS_RECIPE = """\
model: digits-cnn
stages:
  - cast: {target: ".*kernel", dtype: bfloat16}
export: {}
"""


def run(capsys, *argv):
  try:
    code = main(list(argv))
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def _compress(directory: Path, recipe: str, name: str) -> Path:
  (directory / f"{name}.yaml").write_text(recipe)
  out = directory / name
  assert main(["compress", str(directory / f"{name}.yaml"), "--out", str(out)]) == 0
  return out


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory):
  return _compress(tmp_path_factory.mktemp("gen"), LM_RECIPE, "tiny-lm-int8")


def test_generate_json_reports_text_and_both_speeds(capsys, lm_checkpoint):
  code, out, err = run(capsys, "generate", str(lm_checkpoint), "--prompt", "The module ",
                       "--max-new-tokens", "5", "--json")  # fmt: skip
  assert code == 0, err
  payload = json.loads(out)
  assert payload["new_tokens"] == 5 and isinstance(payload["text"], str)
  assert payload["tokens_per_s"] > 0 and payload["float_tokens_per_s"] > 0
  assert payload["serving_mode"] == "integer" and payload["model"] == "tiny-lm"


def test_several_prompts_of_different_lengths_in_one_batch(capsys, lm_checkpoint):
  prompts = ["The module ", "def f(x):\n    return "]
  code, out, err = run(capsys, "generate", str(lm_checkpoint), "--prompt", prompts[0],
                       "--prompt", prompts[1], "--max-new-tokens", "4", "--json")  # fmt: skip
  assert code == 0, err
  batch = json.loads(out)
  assert [c["prompt"] for c in batch["completions"]] == prompts
  assert batch["text"] == batch["completions"][0]["text"]
  # Each row continues its own prompt as it would alone (greedy).
  for completion in batch["completions"]:
    code, out, err = run(capsys, "generate", str(lm_checkpoint), "--prompt",
                         completion["prompt"], "--max-new-tokens", "4", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["text"] == completion["text"]


def test_generate_usage_errors(capsys, lm_checkpoint, tmp_path):
  code, _, err = run(capsys, "generate", str(lm_checkpoint), "--prompt", "x", "--kv-bits", "8")
  assert code == 2 and "quantizes a KV cache" in err and len(err.strip().splitlines()) == 1
  code, _, err = run(capsys, "generate", str(lm_checkpoint), "--prompt", "a long prompt",
                     "--max-len", "4")  # fmt: skip
  assert code == 2 and "max_len" in err
  code, _, err = run(capsys, "generate", str(lm_checkpoint), "--prompt", "")
  assert code == 2 and "empty" in err
  digits = _compress(tmp_path, DIGITS_RECIPE, "digits")
  code, _, err = run(capsys, "generate", str(digits), "--prompt", "hello")
  assert code == 2 and "not a language model" in err
  code, _, err = run(capsys, "generate", str(tmp_path / "missing"), "--prompt", "hello")
  assert code == 1


def test_the_llama_example_recipe_parses():
  path = Path(__file__).resolve().parents[1] / "examples/recipes/llama-tiny-gptq-int4.yaml"
  recipe = parse_recipe(yaml.safe_load(path.read_text()))
  assert recipe.model == "llama-tiny"
  assert "jaxshrink generate out/llama-tiny-int4 --prompt" in path.read_text()
