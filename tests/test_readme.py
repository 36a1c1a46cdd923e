"""The README's quickstart runs as written, and the public names stay pinned."""

import re
from pathlib import Path

import jaxshrink

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_the_two_commands():
  text = README.read_text()
  first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
  assert first_block == ['pip install -e ".[dev]" && jaxshrink demo', "python -m pytest -q -n 2"]
  ci = (README.parent / ".ci" / "run").read_text()
  assert ci.strip().splitlines()[-1] == first_block[1]


def test_readme_technique_sections_are_current():
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "build_readme", README.parent / "docs" / "build_readme.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.render() == README.read_text(), "run `python docs/build_readme.py`"


def test_quickstart_runs(tmp_path, monkeypatch):
  code = re.search(r"## Quickstart \(Python\)\n\n```python\n(.*?)```", README.read_text(), re.S)
  monkeypatch.chdir(tmp_path)
  namespace: dict = {}
  exec(compile(code.group(1), "README quickstart", "exec"), namespace)  # noqa: S102
  assert namespace["logits"].shape == (360, 10)
  assert (tmp_path / "out" / "digits-bf16" / "manifest.json").is_file()
  assert set(jaxshrink.flatten(namespace["restored"])) == set(
    jaxshrink.flatten(namespace["params"])
  )


PUBLIC = {
  "BitmaskSparse",
  "Cast",
  "CheckpointError",
  "DistillLoss",
  "Encoding",
  "JaxshrinkError",
  "LowRank",
  "NMSparse",
  "NoMatchError",
  "QArray",
  "QuantDotGeneral",
  "QuantSpec",
  "Rule",
  "UsageError",
  "cast_params",
  "convert",
  "distill",
  "distill_step",
  "export_safetensors",
  "factorize",
  "flatten",
  "import_safetensors",
  "load",
  "lowrank_apply",
  "map_selected",
  "materialize",
  "oneshot_prune",
  "pruning",
  "ptq",
  "qat_apply",
  "quantize",
  "quantize_params",
  "quantized_apply",
  "read_manifest",
  "register_encoding",
  "save",
  "select",
  "shrink_params",
  "sparsegpt",
  "tree_report",
  "wanda",
}


def test_public_names_are_pinned():
  assert set(jaxshrink.__all__) == PUBLIC
  assert all(hasattr(jaxshrink, name) for name in PUBLIC)
