"""Sharded restore verifies each array from the shards every process holds, never gathered.

Run as a script (tests/test_export_integrity.py does, in subprocesses):

    python tests/export_sharded_checks.py DIR                      # 1 process, 8 devices
    python tests/export_sharded_checks.py DIR HOST:PORT 2 I        # process I of 2, 4 devices each

Every process saves (process 0 writes) a checkpoint with two own-entry arrays (int8 codes
of a 1024x1024 kernel, a 512x512 float32 matrix) and small packed ones. Every process
restores it onto an 8-device mesh with `verify=True` while `digest.partial_sum` records the
blocks it hashes: each must be one shard (never a whole sharded array), and `jax.device_get`
must never see a sharded array. Then process 0 flips one byte of the kernel's array file,
and the restore must fail on every process with a checksum error naming the leaf, while
`verify=False` still loads. Prints one JSON object per process.
"""

from __future__ import annotations

import os
import sys

DEVICES = 8 if len(sys.argv) < 3 else 8 // int(sys.argv[3])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxshrink import CheckpointError, distributed, load, save  # noqa: E402
from jaxshrink.export import digest, shard_like  # noqa: E402
from jaxshrink.quant import QuantSpec, quantize  # noqa: E402


def main() -> dict:
  directory = Path(sys.argv[1])
  if len(sys.argv) > 2:
    distributed.initialize(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
  assert jax.device_count() == 8, jax.devices()
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(1024, 1024)).astype(np.float32)
  params = {
    "dense": {
      "kernel": quantize(kernel, QuantSpec(bits=8)),
      "bias": np.arange(1024, dtype=np.float32),
    },
    "embed": rng.normal(size=(512, 512)).astype(np.float32),
  }
  save(directory, params, overwrite=True)  # collective: process 0 writes, the others wait
  rules = {"dense/kernel": P("data", "model"), "embed": P("model", "data")}
  shardings = shard_like(mesh, rules)

  hashed: list[tuple[int, ...]] = []
  partial_sum = digest.partial_sum

  def recording(values, index, shape, array=0):
    hashed.append((tuple(np.shape(values)), tuple(shape)))
    return partial_sum(values, index, shape, array)

  device_get = jax.device_get

  def guarded(x):
    for leaf in jax.tree.leaves(x):
      if isinstance(leaf, jax.Array) and not leaf.sharding.is_fully_replicated:
        raise AssertionError(f"device_get of a sharded {leaf.shape} array")
    return device_get(x)

  digest.partial_sum, jax.device_get = recording, guarded
  try:
    tree = load(directory, shardings=shardings, verify=True)
  finally:
    digest.partial_sum, jax.device_get = partial_sum, device_get
  codes = tree["dense"]["kernel"].codes
  out = {
    "process": jax.process_index(),
    "codes_spec": str(codes.sharding.spec),
    "codes_local_shards": sorted({s.data.shape for s in codes.addressable_shards}),
    "embed_spec": str(tree["embed"].sharding.spec),
    "hashed_whole_sharded": sorted(
      {f"{v}" for v, whole in hashed if v == whole and whole in ((1024, 1024), (512, 512))}
    ),
    "hashed_blocks": sorted({f"{v} of {whole}" for v, whole in hashed}),
  }
  local = np.concatenate([np.asarray(s.data).ravel() for s in codes.addressable_shards])
  out["codes_equal"] = bool(
    all(
      np.array_equal(np.asarray(s.data), np.asarray(params["dense"]["kernel"].codes)[s.index])
      for s in codes.addressable_shards
    )
    and local.size
  )
  distributed.barrier("verified")

  if jax.process_index() == 0:  # one flipped byte in the middle of the kernel codes' file
    files = [p for p in (directory / "arrays" / "a0").rglob("*") if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2 + 17] ^= 0x40
    victim.write_bytes(bytes(raw))
  distributed.barrier("corrupted")
  try:
    load(directory, shardings=shardings, verify=True)
    out["corruption"] = "not detected"
  except CheckpointError as e:
    out["corruption"] = str(e)
  unverified = load(directory, shardings=shardings, verify=False)
  out["unverified_loads"] = unverified["dense"]["kernel"].codes.shape == (1024, 1024)
  distributed.barrier("done")
  return out


if __name__ == "__main__":
  print(json.dumps(main()), flush=True)
