"""A checkpoint is untrusted input: what its manifest names is never imported.

A sentinel module on PYTHONPATH records every import of itself in a file; checkpoints whose
manifest names it (or `this:s`, which prints the Zen of Python on import, or `os:getcwd`) are
evaluated in a subprocess, which must exit 1 with one line and leave the record empty.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxshrink import CheckpointError, load, save
from jaxshrink.data.sources import checkpoint_data_source
from jaxshrink.models import get_model
from jaxshrink.models.registry import checkpoint_model

ZEN = "Beautiful is better than ugly"
SENTINEL = textwrap.dedent(
  """
  import os
  with open(os.environ["SENTINEL_RECORD"], "a") as f:
    f.write("imported\\n")

  def factory():
    from jaxshrink.models import get_model
    return get_model("digits-cnn")

  def data():
    from jaxshrink.data import get_dataset
    return get_dataset("digits")
  """
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A digits-cnn checkpoint (random init), its float params, and the sentinel module."""
  root = tmp_path_factory.mktemp("trust")
  (root / "pkg").mkdir()
  (root / "pkg" / "jaxshrink_sentinel.py").write_text(SENTINEL)
  params = jax.device_get(get_model("digits-cnn").init(jax.random.key(0)))
  float_dir = save(root / "float", params, model="digits-cnn")
  ckpt = save(root / "ckpt", params, model="digits-cnn", data="digits",
              recipe={"model": "digits-cnn", "params": str(float_dir)})  # fmt: skip
  return root, ckpt


def _variant(root: Path, ckpt: Path, name: str, edit) -> Path:
  import shutil

  out = root / name
  if not out.exists():
    shutil.copytree(ckpt, out)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
  return out


def _eval(root: Path, *argv: str) -> tuple[subprocess.CompletedProcess, list[str]]:
  record = root / f"record-{os.getpid()}-{len(list(root.iterdir()))}.txt"
  path = os.pathsep.join([str(root / "pkg"), os.environ.get("PYTHONPATH", "")])
  env = dict(os.environ, JAX_PLATFORMS="cpu", SENTINEL_RECORD=str(record), PYTHONPATH=path)
  done = subprocess.run([sys.executable, "-m", "jaxshrink.cli", "eval", *argv], env=env,
                        capture_output=True, text=True, timeout=300)  # fmt: skip
  imports = record.read_text().splitlines() if record.exists() else []
  return done, imports


BAD_SOURCES = ["this:s", "os:getcwd", "jaxshrink_sentinel:factory",
               "jaxshrink_sentinel:factory(hidden=8)", "/tmp/model.py",
               "/tmp/digits.npz"]  # fmt: skip
FLAGS = {"model": "--model", "data": "--data", "recipe.model": "--reference-model"}


def _set(manifest: dict, field: str, value: str) -> None:
  if field == "recipe.model":
    manifest["recipe"]["model"] = value
  else:
    manifest[field] = value


def _bad(root: Path, ckpt: Path, field: str, value: str) -> Path:
  name = f"bad-{field}-{BAD_SOURCES.index(value)}"
  return _variant(root, ckpt, name, lambda m: _set(m, field, value))


def _check_line(stderr: str, field: str, value: str) -> None:
  lines = stderr.strip().splitlines()
  assert len(lines) == 1, lines
  assert f"manifest field `{field}` names {value!r}" in lines[0]
  assert f"`{FLAGS[field]} module:factory`" in lines[0] and "nothing was loaded" in lines[0]


@pytest.mark.parametrize(("field", "value"), [("model", "this:s"), ("model", "os:getcwd"),
                         ("data", "jaxshrink_sentinel:data"),
                         ("recipe.model", "jaxshrink_sentinel:factory")])  # fmt: skip
def test_cli_eval_refuses_code_named_by_the_manifest(world, field, value):
  root, ckpt = world
  if value not in BAD_SOURCES:
    BAD_SOURCES.append(value)
  done, imports = _eval(root, str(_bad(root, ckpt, field, value)))
  assert done.returncode == 1, done.stderr[-2000:]
  _check_line(done.stderr, field, value)
  assert ZEN not in done.stdout + done.stderr
  assert imports == []


@pytest.mark.parametrize("field", list(FLAGS))
def test_eval_imports_nothing_the_manifest_names(world, field, capsys, monkeypatch):
  from jaxshrink.cli import main

  root, ckpt = world
  monkeypatch.syspath_prepend(str(root / "pkg"))  # importable, were anything to import it
  monkeypatch.setenv("SENTINEL_RECORD", str(root / f"in-process-{field}.txt"))
  # Warm up the lazy imports of the code that runs up to a refusal, with a name that is
  # refused without anything to import.
  warm = _variant(root, ckpt, f"warm-{field}", lambda m: _set(m, field, "no-such-source"))
  assert main(["eval", str(warm)]) == 1
  capsys.readouterr()
  for value in BAD_SOURCES:
    bad = _bad(root, ckpt, field, value)
    before = set(sys.modules)
    assert main(["eval", str(bad)]) == 1, value
    out, err = capsys.readouterr()
    assert set(sys.modules) - before == set(), value
    _check_line(err, field, value)
    assert ZEN not in out + err
  assert not (root / f"in-process-{field}.txt").exists()


def test_user_typed_factory_evaluates_a_checkpoint_that_names_it(world):
  root, ckpt = world

  def edit(manifest):
    manifest["model"] = manifest["recipe"]["model"] = "jaxshrink_sentinel:factory"

  mine = _variant(root, ckpt, "mine", edit)
  done, imports = _eval(root, str(mine))
  assert done.returncode == 1 and imports == []
  done, imports = _eval(root, str(mine), "--model", "jaxshrink_sentinel:factory", "--data",
                        "jaxshrink_sentinel:data", "--json")  # fmt: skip
  assert done.returncode == 0, done.stderr[-2000:]
  assert imports == ["imported"]  # typed by the user: imported, once
  payload = json.loads(done.stdout)
  assert payload["model"] == "jaxshrink_sentinel:factory"
  assert payload["value"] == payload["reference_value"]  # the same float params


def test_python_api_loads_without_importing(world, monkeypatch):
  root, ckpt = world
  monkeypatch.setenv("SENTINEL_RECORD", str(root / "api-record.txt"))
  names = {"model": "jaxshrink_sentinel:factory", "data": "this:s"}
  mine = _variant(root, ckpt, "mine-api", lambda m: m.update(names))
  before = set(sys.modules)
  tree = load(mine)
  assert set(sys.modules) - before == set()
  assert not (root / "api-record.txt").exists()
  expected = jax.device_get(get_model("digits-cnn").init(jax.random.key(0)))
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(a, b)


def test_checkpoint_model_resolves_zoo_names_with_literal_overrides_only():
  model = checkpoint_model("digits-cnn(hidden=64)", field="model", where="ck")
  assert model.name == "digits-cnn(hidden=64)"
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  assert shapes["dense1"]["kernel"].shape[-1] == 64
  with pytest.raises(CheckpointError, match=r"field `model` names 'os:getcwd'.*--model"):
    checkpoint_model("os:getcwd", field="model", where="ck")
  with pytest.raises(CheckpointError, match=r"`ck`: manifest field `recipe.model`.*literal"):
    checkpoint_model("digits-cnn(hidden=__import__('os'))", field="recipe.model", where="ck")
  with pytest.raises(CheckpointError, match=r"field `model` is 7, not a string"):
    checkpoint_model(7, field="model", where="ck")
  with pytest.raises(CheckpointError, match=r"cannot be rebuilt"):
    checkpoint_model("digits-cnn(no_such_field=1)", field="model", where="ck")
  assert checkpoint_data_source("digits", field="data", where="ck").num_classes == 10
  for bad in ("pkg:data", "x.npz", "x.txt", None):
    with pytest.raises(CheckpointError, match=r"field `data` names .*--data"):
      checkpoint_data_source(bad, field="data", where="ck")
