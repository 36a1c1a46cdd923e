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
# Places that gather a whole parameter (documented in docs/design.md, "Sharding"): none
# among these; SVD and the GPTQ/SparseGPT column sweeps gather one matrix on the host, which
# these checks run outside the compiled program.
GATHERS: set[str] = set()


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


def test_mask_ranking_keeps_model_split_scores_in_place(results):
  # Ranking counts against a threshold found bit by bit instead of sorting, so a kernel split
  # over the model axis is never gathered and its mask keeps the kernel's layout.
  for name in ("mp2x4/masks_uniform", "mp2x4/masks_global", "mp2x4/prune_step"):
    assert results[name]["gathers"] == [], name
    assert results[name]["layout"] == [], name
