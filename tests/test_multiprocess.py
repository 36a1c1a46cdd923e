"""The pod job on two CPU processes (4 devices each, gloo collectives), against one process.

The pair runs `python -m jaxshrink.podjob` (the same module `tpu/launch.sh` runs on every TPU
VM worker) with `tpu/recipes/digits-cnn-prune-qat.yaml`: gradual pruning and int8 QAT on a
global batch split over 8 devices, model-parallel 2. It writes a multi-host orbax checkpoint
and the compact export; a fresh pair restores both and evaluates. A single process with one
device runs the same job at the same time.

Eight devices add in another order than one, and training amplifies that rounding noise: a
weight near the magnitude-pruning threshold can land on the other side of it, and Adam turns tiny
gradient differences into full-size steps. How far the runs drift depends on the CPU. So the
tests check what noise cannot explain: the first steps agree to f32 rounding, sparsity is exact,
masks differ only at weights tied with the threshold, each export is faithful to its own
weights, and every prediction that differs is a near-tie.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jaxshrink import data, export
from jaxshrink.data import cache_dir
from jaxshrink.models import get_model

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "tpu" / "recipes" / "digits-cnn-prune-qat.yaml"
STEPS = 20
# Steps before the first pruning update, when the runs differ by f32 rounding only.
EARLY = 4
# Relative distance allowed between the two runs' weights after STEPS steps. A sharding bug
# (a shard summed twice, a gradient not averaged) moves them by far more than this.
DRIFT = 0.05


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(args: list[str], devices: int, log: Path) -> subprocess.Popen:
  env = dict(os.environ)
  env.update(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(cache_dir() / "xla"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  with open(log, "w") as out:
    # Own session: a timeout kills the process group, gloo and orbax threads included.
    return subprocess.Popen(
      [sys.executable, "-m", "jaxshrink.podjob", *args], cwd=ROOT, env=env, stdout=out,
      stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _pair(args: list[str], tmp: Path, name: str) -> list[subprocess.Popen]:
  port = _free_port()
  flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id"]
  return [_launch([*args, *flags, str(i)], 4, tmp / f"{name}.{i}.log") for i in range(2)]


def _wait(procs: list[subprocess.Popen], timeout: float, tmp: Path) -> None:
  deadline = time.monotonic() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pytest.fail(f"pod job processes ran past {timeout:.0f} s; logs in {tmp}")
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  failed = [p.args for p in procs if p.returncode]
  if failed:
    logs = "\n".join(
      f"--- {log.name}\n" + "\n".join(
        line for line in log.read_text().splitlines()[-15:] if "Gloo" not in line
      )
      for log in sorted(tmp.glob("*.log"))
    )  # fmt: skip
    pytest.fail(f"pod job failed: {failed}\n{logs}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
  tmp = tmp_path_factory.mktemp("podjob")
  # Start from a fixed random init (no wait on the zoo cache), recorded as a float checkpoint.
  model = get_model("digits-cnn")
  export.save(tmp / "init", jax.device_get(model.init(jax.random.key(0))), model="digits-cnn",
              data="digits")  # fmt: skip
  recipe = yaml.safe_load(RECIPE.read_text())
  recipe["params"] = str(tmp / "init")
  (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
  job = ["--recipe", str(tmp / "recipe.yaml"), "--steps", str(STEPS)]
  single = _launch([*job, "--out", str(tmp / "single")], 1, tmp / "single.log")
  _wait([single, *_pair([*job, "--out", str(tmp / "pair"), "--model-parallel", "2"], tmp,
                        "train")], 300, tmp)  # fmt: skip
  _wait(_pair(["--evaluate", str(tmp / "pair"), "--model-parallel", "2"], tmp, "eval"), 200, tmp)
  return tmp


def _restore_train(path: Path) -> dict:
  import orbax.checkpoint as ocp

  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckpt:
    meta = ckpt.metadata(path).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    return jax.device_get(ckpt.restore(path, target))


def test_two_processes_train_like_one(runs):
  single = json.loads((runs / "single" / "result.json").read_text())
  pair = json.loads((runs / "pair" / "result.json").read_text())
  assert (pair["processes"], pair["devices"], pair["mesh"]) == (2, 8, {"data": 4, "model": 2})
  assert (single["processes"], single["devices"]) == (1, 1)
  np.testing.assert_allclose(pair["losses"][:EARLY], single["losses"][:EARLY], rtol=1e-5)
  np.testing.assert_allclose(pair["losses"], single["losses"], rtol=1e-2)
  assert (
    pair["sparsity"]
    == single["sparsity"]
    == {p: 0.5 for p in ("conv1/kernel", "conv2/kernel", "dense1/kernel", "dense2/kernel")}
  )
  a, b = _restore_train(runs / "pair" / "train"), _restore_train(runs / "single" / "train")
  for layer, mask in b["masks"].items():
    mine, theirs = np.asarray(a["masks"][layer]["kernel"]), np.asarray(mask["kernel"])
    swapped = mine != theirs
    assert swapped.mean() <= 0.01, (layer, swapped.sum())
    # Only weights near the threshold change sides: each is among the smallest tenth that either
    # run kept (the run that pruned one holds a zero there, the other its magnitude).
    w = np.maximum(*(np.abs(np.asarray(r["params"][layer]["kernel"])) for r in (a, b)))
    kept = np.sort(w[theirs.astype(bool)])
    assert np.all(np.searchsorted(kept, w[swapped]) <= 0.1 * kept.size), layer
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
    assert _relative_distance(x, y) <= DRIFT


def _relative_distance(x, y) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12))


def test_compact_exports_agree(runs):
  pair, single = export.load(runs / "pair" / "compact"), export.load(runs / "single" / "compact")
  trained = {
    "pair": _restore_train(runs / "pair" / "train")["params"],
    "single": _restore_train(runs / "single" / "train")["params"],
  }
  for layer in ("conv1", "conv2", "dense1", "dense2"):
    q, r = pair[layer]["kernel"], single[layer]["kernel"]
    assert (q.bits, q.codes.dtype) == (8, np.int8)
    # Each export is its own run's weights rounded to the int8 grid (codes keep a conv kernel as
    # a (fan_in, out) matrix): at most half a step off, with the zeros pruned kept.
    for name, export_q in (("pair", q), ("single", r)):
      w = np.reshape(np.asarray(trained[name][layer]["kernel"], np.float64), r.codes.shape)
      step = np.asarray(export_q.scale, np.float64)
      codes = np.asarray(export_q.codes, np.float64)
      assert np.all(np.abs(codes * step - w) <= 0.5 * step * (1 + 1e-5)), (name, layer)
      assert np.all(codes[w == 0] == 0), (name, layer)
    # The two exports differ by the two runs' drift, asserted in the test above.
    assert _relative_distance(q.scale, r.scale) <= DRIFT, layer
    assert _relative_distance(q.codes * q.scale, r.codes * r.scale) <= DRIFT, layer
    assert _relative_distance(pair[layer]["bias"], single[layer]["bias"]) <= DRIFT, layer


def _test_logits(path: Path) -> np.ndarray:
  model = get_model("digits-cnn")
  tree = export.load(path, dense=True)
  return np.asarray(jax.jit(model.apply)(tree, data.get_dataset("digits").x_test), np.float64)


def test_accuracy_differs_only_where_float_noise_can_flip_a_prediction(runs):
  single = json.loads((runs / "single" / "result.json").read_text())
  pair = json.loads((runs / "pair" / "result.json").read_text())
  y = data.get_dataset("digits").y_test
  a, b = _test_logits(runs / "single" / "compact"), _test_logits(runs / "pair" / "compact")
  assert single["accuracy"] == pytest.approx(np.mean(a.argmax(-1) == y), abs=1e-12)
  assert pair["accuracy"] == pytest.approx(np.mean(b.argmax(-1) == y), abs=1e-12)
  # The exports differ by the runs' drift (above); the logits move by `noise`, which flips a
  # prediction only where the top two logits are within 2 * noise.
  noise = float(np.abs(a - b).max())
  top = np.sort(a, axis=-1)
  ambiguous = top[:, -1] - top[:, -2] <= 2 * noise
  flipped = a.argmax(-1) != b.argmax(-1)
  assert not np.any(flipped & ~ambiguous)
  assert noise < DRIFT * float(np.abs(a).max()), noise
  images = len(y)
  assert abs(round(pair["accuracy"] * images) - round(single["accuracy"] * images)) <= (
    ambiguous.sum()
  )


def test_fresh_pair_restores_and_evaluates(runs):
  pair = json.loads((runs / "pair" / "result.json").read_text())
  evaluated = json.loads((runs / "pair" / "evaluate.json").read_text())
  assert evaluated["processes"] == 2
  # The same processes, mesh and export as the training pair: the same predictions exactly.
  assert evaluated["accuracy"] == pair["accuracy"]
  params = _restore_train(runs / "pair" / "train")["params"]
  total = sum(float(np.abs(np.asarray(a, np.float64)).sum()) for a in jax.tree.leaves(params))
  assert evaluated["params_abs_sum"] == pytest.approx(total, rel=1e-5)
