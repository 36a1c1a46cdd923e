"""The library's import graph keeps two knots untied.

Imports inside functions count: a lazy import still makes two modules depend on each other.
"""

import ast
import collections
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in (ROOT / "jaxshrink").rglob("*.py")}


def _imports(path: Path) -> set[str]:
  """The jaxshrink modules `path` imports, at the top or inside a function."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.add(node.module)
      found.update(f"{node.module}.{alias.name}" for alias in node.names)
    elif isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
  return {name for name in found if name in MODULES}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _reaches(start: str, goal: str) -> bool:
  seen, todo = set(), collections.deque([start])
  while todo:
    for nxt in GRAPH[todo.popleft()]:
      if nxt == goal:
        return True
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return False


STAGE_MODULES = sorted(
  name for name in MODULES if name.endswith((".stage", "_stage")) or name == "jaxshrink.stages"
)


def test_stage_modules_register_without_importing_recipes():
  assert len(STAGE_MODULES) >= 7, STAGE_MODULES
  for name in STAGE_MODULES:
    assert "jaxshrink.recipes" not in GRAPH[name], f"{name} imports jaxshrink.recipes"
    assert "jaxshrink.pipeline" in GRAPH[name] or name == "jaxshrink.stages", name


@pytest.mark.parametrize("name", ["jaxshrink.recipes", "jaxshrink.pipeline", *STAGE_MODULES])
def test_recipes_and_stages_are_not_in_an_import_cycle(name):
  assert not _reaches(name, name), f"{name} imports itself through other modules"


def test_the_minilm_model_does_not_import_its_dataset():
  assert "jaxshrink.data.sentences" not in GRAPH["jaxshrink.models.minilm"]
  assert "jaxshrink.data" not in GRAPH["jaxshrink.models.minilm"]
