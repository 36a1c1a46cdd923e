"""Quantized dot_general with sharded inputs (8 simulated CPU devices, in a subprocess).

The pytest process already initialized JAX with one device, so `quant_sharding_checks.py`
runs in a fresh interpreter with `--xla_force_host_platform_device_count=8`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("quant_sharding_checks.py")


@pytest.fixture(scope="module")
def results():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_mode_and_layout_ran(results):
  modes = ("fake", "int", "int_full", "serve")
  layouts = ("dp8", "mp2x4", "mp2x4-contract")
  assert set(results) == {f"{m}/{lay}" for m in modes for lay in layouts}


def test_sharded_equals_single_device(results):
  # Integer accumulation is exact and scales reduce over whole rows/columns, so the results
  # match the single-device ones up to float32 rescale/reduction order.
  errors = {case: r["max_err"] for case, r in results.items()}
  assert all(err <= 1e-4 for err in errors.values()), errors


def test_outputs_keep_row_and_column_shardings(results):
  bad = {case: r["out_sharding"] for case, r in results.items() if not r["out_sharding_ok"]}
  assert not bad


def test_no_collectives_when_the_contraction_is_not_split(results):
  # Per-token and per-channel scales reduce over the contraction only: with it unsplit, the
  # forward needs no communication at all (weights are never gathered).
  for case, r in results.items():
    if not case.endswith("contract"):
      assert r["collectives"] == [], (case, r["collectives"])
