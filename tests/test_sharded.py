"""Compression transforms on sharded params equal their single-device results.

`tests/sharded_checks.py` runs every check in one subprocess with 8 simulated CPU devices
(JAX fixes the device count at start-up, and this process has one); see its docstring.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxshrink.data import cache_dir

SCRIPT = Path(__file__).with_name("sharded_checks.py")
TRANSFORMS = ("masks_uniform", "masks_global", "convert", "quantize_int4", "qat_dot",
              "prune_step", "distill", "hessians", "gptq", "sparsegpt", "svd")  # fmt: skip
CHEAP = ("convert", "qat_dot")  # also on the (4, 2) mesh
# Places that gather a whole parameter (documented in docs/design.md, "Sharding").
GATHERS = {"masks_uniform", "masks_global", "prune_step"}


@pytest.fixture(scope="module")
def results() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  done = subprocess.run(
    [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300,
    cwd=SCRIPT.parent.parent,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout)
  assert "_error" not in out, out["_error"]
  out.pop("_seconds")
  cache_dir()  # the script shares the persistent XLA cache of the suite
  return out


CASES = [(m, t) for m in ("dp8", "mp2x4") for t in TRANSFORMS] + [("mp4x2", t) for t in CHEAP]


@pytest.mark.parametrize(("mesh", "transform"), CASES)
def test_sharded_equals_single_device(results, mesh, transform):
  check = results[f"{mesh}/{transform}"]
  assert check["equal"], check
  if transform not in GATHERS or mesh == "dp8":
    assert check["layout"] == [], check["layout"]
    assert check["gathers"] == [], check["gathers"]


def test_mask_ranking_gathers_only_on_model_meshes(results):
  # Ranking sorts each leaf's scores; XLA sorts a split array by gathering it, so standalone
  # masks come out replicated (documented). Inside a training step the wrapper's masks keep
  # their weight's layout (prune_step above), though the ranking still gathers the scores.
  assert results["dp8/masks_global"]["gathers"] == []
  for name in ("mp2x4/masks_uniform", "mp2x4/masks_global"):
    assert results[name]["gathers"] != [], name
