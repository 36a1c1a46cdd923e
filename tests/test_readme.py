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
  "Cast",
  "CheckpointError",
  "Encoding",
  "JaxshrinkError",
  "NoMatchError",
  "Rule",
  "UsageError",
  "cast_params",
  "flatten",
  "load",
  "map_selected",
  "materialize",
  "read_manifest",
  "register_encoding",
  "save",
  "select",
  "tree_report",
}


def test_public_names_are_pinned():
  assert set(jaxshrink.__all__) == PUBLIC
  assert all(hasattr(jaxshrink, name) for name in PUBLIC)
