"""Checkpoint safety: killed saves, damaged files, mismatched models, interop, sharding."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from jaxshrink import Cast, CheckpointError, cast_params, load, save
from jaxshrink.export import (
  check_matches,
  export_safetensors,
  import_safetensors,
  read_manifest,
)

WRITER = textwrap.dedent(
  """
  import sys, numpy as np
  from jaxshrink import save
  target = sys.argv[1]
  trees = [{"w": np.full((512, 512), float(i), np.float32)} for i in (1, 2)]
  print("ready", flush=True)
  i = 0
  while True:
    save(target, trees[i % 2], overwrite=True)
    i += 1
  """
)


def test_killed_save_never_leaves_a_half_checkpoint(tmp_path):
  target = tmp_path / "ck"
  save(target, {"w": np.full((512, 512), 1.0, np.float32)})
  rng = np.random.default_rng(0)
  for _ in range(5):
    proc = subprocess.Popen(
      [sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
      assert proc.stdout.readline().strip() == "ready"
      time.sleep(float(rng.uniform(0.05, 1.0)))
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=30)
    tree = load(target)  # the previous or the new checkpoint, whole
    value = float(tree["w"][0, 0])
    assert value in (1.0, 2.0)
    np.testing.assert_array_equal(tree["w"], np.full((512, 512), value, np.float32))
  names = [p.name for p in tmp_path.iterdir()]
  save(target, {"w": np.zeros(3, np.float32)}, overwrite=True)  # also reclaims stale staging
  assert [p.name for p in tmp_path.iterdir()] == ["ck"], names


def _data_files(directory):
  return sorted(
    (
      p
      for p in (directory / "arrays").rglob("*")
      if p.is_file() and not p.name.startswith(("_", "."))
    ),
    key=lambda p: p.stat().st_size,
  )


def test_truncated_tensor_file(tmp_path):
  save(tmp_path / "ck", {"w": jax.random.normal(jax.random.key(0), (128, 128))})
  victim = _data_files(tmp_path / "ck")[-1]
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  with pytest.raises(CheckpointError, match="truncated or damaged|Checksum mismatch in leaf `w`"):
    load(tmp_path / "ck")


def test_missing_tensor_file(tmp_path):
  save(tmp_path / "ck", {"w": jax.random.normal(jax.random.key(0), (128, 128))})
  for victim in _data_files(tmp_path / "ck"):
    os.remove(victim)
  with pytest.raises(CheckpointError, match="truncated or damaged|lacks arrays"):
    load(tmp_path / "ck")


def test_manifest_must_match_model(tmp_path):
  save(tmp_path / "ck", {"dense": {"kernel": np.zeros((4, 3), np.float32)}})
  manifest = read_manifest(tmp_path / "ck")
  check_matches(manifest, {"dense/kernel": (4, 3)}, what="m")
  with pytest.raises(CheckpointError, match=r"missing conv/kernel.*do not match|do not match"):
    check_matches(manifest, {"dense/kernel": (4, 3), "conv/kernel": (3, 3)}, what="m")
  with pytest.raises(CheckpointError, match=r"shape mismatch dense/kernel \(4, 3\) != \(4, 4\)"):
    check_matches(manifest, {"dense/kernel": (4, 4)}, what="m")


def test_safetensors_round_trip_is_bit_exact(tmp_path):
  params = {
    "enc": {"kernel": jax.random.normal(jax.random.key(0), (16, 8)), "bias": np.arange(8.0)},
    "head": {"kernel": jax.random.normal(jax.random.key(1), (8, 2))},
  }
  ctree = cast_params(params, "enc/kernel")
  path = export_safetensors(ctree, tmp_path / "m.safetensors", metadata={"model": "x"})
  back = import_safetensors(path)
  assert isinstance(back["enc"]["kernel"], Cast)
  np.testing.assert_array_equal(
    np.asarray(back["enc"]["kernel"].values), np.asarray(ctree["enc"]["kernel"].values)
  )
  np.testing.assert_array_equal(back["head"]["kernel"], np.asarray(params["head"]["kernel"]))
  from safetensors import safe_open

  with safe_open(str(path), framework="numpy") as f:
    layout = json.loads(f.metadata()["jaxshrink.layout"])
    assert "enc/kernel:values" in f.keys()
  assert layout["leaves"][0]["meta"]["encoding"] in ("array", "cast")
  assert layout["version"] == 2


def test_safetensors_rejects_foreign_files(tmp_path):
  from safetensors.numpy import save_file

  save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
  with pytest.raises(CheckpointError, match="not written by jaxshrink"):
    import_safetensors(tmp_path / "other.safetensors")
  with pytest.raises(CheckpointError, match="does not exist"):
    import_safetensors(tmp_path / "missing.safetensors")


SHARDED = textwrap.dedent(
  """
  import sys, numpy as np, jax
  from jax.sharding import Mesh, PartitionSpec as P
  from jaxshrink import cast_params, load, save
  from jaxshrink.export import shard_like
  assert len(jax.devices()) == 8
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  kernel = (np.arange(64 * 32) % 128).astype(np.float32).reshape(64, 32)  # exact in bf16
  params = {"dense": {"kernel": kernel,
                      "bias": np.arange(32, dtype=np.float32)}}
  save(sys.argv[1], cast_params(params, "dense/kernel"))
  tree = load(sys.argv[1], shardings=shard_like(mesh, {"dense/kernel": P("data", "model")}))
  values = tree["dense"]["kernel"].values
  assert values.sharding.spec == P("data", "model"), values.sharding
  assert {s.data.shape for s in values.addressable_shards} == {(16, 16)}
  np.testing.assert_array_equal(np.asarray(tree["dense"]["kernel"].materialize()), kernel)
  assert tree["dense"]["bias"].sharding.is_fully_replicated
  print("ok")
  """
)


def test_sharded_restore_on_8_simulated_devices(tmp_path):
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    "JAX_PLATFORMS": "cpu",
  }
  result = subprocess.run(
    [sys.executable, "-c", SHARDED, str(tmp_path / "ck")],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().endswith("ok")
