"""Checkpoint safety: killed saves, damaged files, mismatched models, interop, sharding."""

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

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

# A writer that stops inside `save` at a chosen point and tells the parent, which then kills it.
WRITER = textwrap.dedent(
  """
  import os, sys, time, numpy as np
  from jaxshrink import save
  from jaxshrink.export import checkpoint, storage
  target, point = sys.argv[1], sys.argv[2]

  def stall(*args):
    print("stalled", os.getpid(), flush=True)
    time.sleep(600)

  if point == "arrays":  # staging holds the array data; no manifest yet
    write = storage.write
    def hooked(directory, arrays, *args):
      write(directory, arrays, *args)
      stall()
    storage.write = hooked
  else:  # "rename": staging is a complete checkpoint; the exchange has not happened
    checkpoint._exchange = stall
  save(target, {"w": np.full((512, 512), 2.0, np.float32), "b": np.arange(3.0)}, overwrite=True)
  print("finished", flush=True)
  """
)


def _files(root):
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("point", ["arrays", "rename"])
def test_save_killed_mid_save_keeps_the_previous_checkpoint(tmp_path, point):
  target = tmp_path / "ck"
  previous = {"w": np.full((512, 512), 1.0, np.float32), "b": np.arange(3.0) - 1}
  save(target, previous)
  before = _files(target)
  proc = subprocess.Popen(
    [sys.executable, "-c", WRITER, str(target), point], stdout=subprocess.PIPE, text=True
  )
  watchdog = threading.Timer(240, proc.kill)  # a writer that never reaches the hook fails
  watchdog.start()
  try:
    line = proc.stdout.readline().split()
    assert line == ["stalled", str(proc.pid)], line  # the writer is inside save, stopped
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(".ck.partial-")]
    assert len(staging) == 1, staging
    data = [p for p in (staging[0] / "arrays").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in data) >= 512 * 512 * 4  # array data is written
    assert (staging[0] / "manifest.json").is_file() == (point == "rename")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
  finally:
    watchdog.cancel()
    proc.kill()
    proc.stdout.close()
  assert staging[0].is_dir()  # the kill left the half-written staging directory behind
  assert _files(target) == before  # the previous checkpoint, byte for byte
  tree = load(target, verify=True)
  np.testing.assert_array_equal(tree["w"], previous["w"])
  np.testing.assert_array_equal(tree["b"], previous["b"])
  save(target, {"w": np.zeros(3, np.float32)}, overwrite=True)  # reclaims the stale staging
  assert [p.name for p in tmp_path.iterdir()] == ["ck"]
  np.testing.assert_array_equal(load(target)["w"], np.zeros(3, np.float32))


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


CHECKS = Path(__file__).with_name("export_sharded_checks.py")


def _sharded_run(directory, processes: int = 1) -> list[dict]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  port = []
  if processes > 1:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = [f"127.0.0.1:{s.getsockname()[1]}", str(processes)]
  procs = [
    subprocess.Popen([sys.executable, str(CHECKS), str(directory), *port,
                      *([str(i)] if port else [])], env=env, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True, start_new_session=True)
    for i in range(processes)
  ]  # fmt: skip
  results = []
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=300)
      assert proc.returncode == 0, err[-3000:]
      results.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
  return results


def _check_sharded(result: dict) -> None:
  assert result["codes_spec"] == "P('data', 'model')"
  assert result["codes_local_shards"] == [[256, 512]]
  assert result["codes_equal"]
  assert result["hashed_whole_sharded"] == []  # no sharded array was hashed whole
  assert "(256, 512) of (1024, 1024)" in result["hashed_blocks"]
  assert "(256, 128) of (512, 512)" in result["hashed_blocks"]
  assert result["corruption"].startswith("Checksum mismatch in leaf `dense/kernel` of")
  assert result["unverified_loads"]


def test_sharded_restore_verifies_local_shards_on_8_devices(tmp_path):
  (result,) = _sharded_run(tmp_path / "ck")
  _check_sharded(result)


def test_sharded_restore_verifies_local_shards_on_2_processes(tmp_path):
  results = _sharded_run(tmp_path / "ck", processes=2)
  for result in results:
    _check_sharded(result)
  # Process 1 hashes only the shards it holds: the replicated small arrays are process 0's.
  assert len(results[1]["hashed_blocks"]) < len(results[0]["hashed_blocks"])


def test_partial_sums_over_any_blocks_add_up_to_the_digest():
  from jaxshrink.export.digest import as_hex, data_sum, partial_sum

  rng = np.random.default_rng(0)
  for dtype, shape in (("int8", (10, 7)), ("float32", (6, 5, 3)), ("bfloat16", (9,)),
                       ("uint8", ()), ("float16", (4, 0))):  # fmt: skip
    a = rng.normal(size=shape).astype(dtype) if dtype != "uint8" else np.uint8(200).reshape(())
    cuts = [sorted({0, d, *rng.integers(0, d + 1, 2).tolist()}) for d in a.shape]
    total = 0
    for index in itertools.product(*[list(zip(c, c[1:], strict=False)) for c in cuts]):
      index = tuple(slice(lo, hi) for lo, hi in index)
      total += partial_sum(a[index], index, a.shape)
    assert as_hex(total) == as_hex(data_sum([a])), (dtype, shape)
    if a.size:  # any one changed element changes the digest
      b = a.copy().reshape(-1)
      b.view(np.uint8)[0] ^= 1
      assert data_sum([b.reshape(a.shape)]) != data_sum([a])
  a, b = np.arange(6, dtype=np.int32), np.arange(6, dtype=np.int32) + 1
  assert data_sum([a[::-1].copy()]) != data_sum([a])  # positions count
  assert data_sum([a, b]) != data_sum([b, a])  # so does which array holds what
  assert data_sum([a, b]) == (data_sum([a]) + partial_sum(b, (slice(None),), (6,), 1)) % 2**64
