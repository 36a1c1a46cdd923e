"""Meshes, shardings and multi-process start-up for compressing sharded models.

Every transform in jaxshrink is a jittable function of a param tree, so it runs on params
laid out over a `jax.sharding.Mesh` as is: XLA partitions the computation and the outputs
keep the weights' layout. This module holds the few pieces a sharded job adds:

- `initialize`: `jax.distributed` from explicit flags (CPU processes, tests) or from the
  TPU VM environment (no arguments: JAX autodetects the pod's workers);
- `make_mesh`: a `("data", "model")` mesh over all devices of all processes;
- `param_shardings`: data-parallel (replicated) or model-parallel (kernels and biases split
  on their output axis) `NamedSharding`s for a param tree;
- `encoding_shardings`: where each array of a compressed leaf belongs, given its weight's
  sharding (codes and masks like the weight, scales and factors along the kept output axis);
- `global_batch` / `to_host`: global arrays from host data, and back, across processes.

>>> mesh = make_mesh(model_parallel=2)                       # (devices // 2, 2)
>>> params = jax.device_put(params, param_shardings(mesh, params, model_axis="model"))
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxshrink.encoding import Encoding
from jaxshrink.errors import UsageError

DATA, MODEL = "data", "model"


def initialize(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Starts `jax.distributed` once, if this is a multi-process run.

  Args:
    coordinator: `host:port` of process 0; with it, `num_processes` and `process_id` are
      required (CPU processes use gloo collectives). Without it, a TPU VM pod
      (`TPU_WORKER_HOSTNAMES` or `MEGASCALE_COORDINATOR_ADDRESS` set) is autodetected and
      anything else stays single-process.
    num_processes: total number of processes.
    process_id: this process's index in `[0, num_processes)`.

  Raises:
    UsageError: a coordinator without a process count and index, or an index out of range.
  """
  if jax.distributed.is_initialized():
    return
  if coordinator is None:
    if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
      jax.distributed.initialize()  # every worker of the pod: JAX reads the TPU metadata
    return
  if num_processes is None or process_id is None or not 0 <= process_id < num_processes:
    raise UsageError(
      f"--coordinator {coordinator} needs --num-processes N and --process-id in [0, N); got "
      f"num_processes={num_processes}, process_id={process_id}. Start one process per index."
    )
  if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
  )


def make_mesh(model_parallel: int = 1) -> Mesh:
  """A `("data", "model")` mesh over every device of every process.

  Raises:
    UsageError: `model_parallel` does not divide the device count.
  """
  count = jax.device_count()
  if model_parallel < 1 or count % model_parallel:
    raise UsageError(
      f"--model-parallel must divide the {count} devices; got {model_parallel}. Use one of "
      f"{[d for d in range(1, count + 1) if count % d == 0]}."
    )
  # Auto axes: XLA propagates shardings through the unmodified transforms (no explicit
  # sharding-in-types annotations needed in user code).
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((count // model_parallel, model_parallel), (DATA, MODEL), axis_types=auto)


def param_shardings(mesh: Mesh, params: Any, *, model_axis: str | None = None) -> Any:
  """`NamedSharding`s for `params`: replicated, or split on the output axis over `model_axis`.

  With `model_axis`, every leaf whose last dim divides by that mesh axis's size (Dense
  `(in, out)` and conv `(kh, kw, cin, out)` kernels, biases) is split along it; other leaves
  are replicated. Without it (data parallel), everything is replicated.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  if model_axis is None or mesh.shape.get(model_axis, 1) == 1:
    return jax.tree.map(lambda _: replicated, params)
  size = mesh.shape[model_axis]

  def spec(leaf):
    if np.ndim(leaf) and np.shape(leaf)[-1] % size == 0:
      return NamedSharding(mesh, PartitionSpec(*([None] * (np.ndim(leaf) - 1)), model_axis))
    return replicated

  return jax.tree.map(spec, params)


def encoding_arrays(leaf: Encoding, prefix: str = "") -> dict[str, jax.Array]:
  """The arrays of an encoding by dotted field name (nested encodings flattened)."""
  out = {}
  for name, child in leaf.children().items():
    if isinstance(child, Encoding):
      out.update(encoding_arrays(child, f"{prefix}{name}."))
    elif child is not None:
      out[prefix + name] = child
  return out


def encoding_shardings(leaf: Encoding, weight_sharding: Any) -> dict[str, Any]:
  """Sensible shardings for each array of a compressed leaf, from its weight's sharding.

  An array whose last dim is the weight's output size `N` (int8 or packed codes `(K', N)`,
  scales and zero points `(G, N)`, low-rank `b (r, N)`, masks) is split like the weight's
  output axis; every other array (per-input scales, `a (K, r)`, activation scales) is
  replicated. Leaves whose weight is replicated stay replicated.
  """
  mesh = weight_sharding.mesh
  spec = tuple(weight_sharding.spec) + (None,) * (len(leaf.shape) - len(weight_sharding.spec))
  out_axis = spec[-1] if spec else None
  n = leaf.shape[-1] if leaf.shape else 0
  result = {}
  for name, array in encoding_arrays(leaf).items():
    parts: list[Any] = [None] * np.ndim(array)
    if out_axis is not None and np.ndim(array) and np.shape(array)[-1] == n:
      parts[-1] = out_axis
    result[name] = NamedSharding(mesh, PartitionSpec(*parts))
  return result


def global_batch(mesh: Mesh, batch: np.ndarray, axis: str = DATA) -> jax.Array:
  """A global array split over `axis` on its first dim, from the full host batch.

  Every process passes the same global batch (e.g. the same indices into the same dataset)
  and contributes only the rows of its own devices, so no host sends data to another.
  """
  batch = np.asarray(batch)
  sharding = NamedSharding(mesh, PartitionSpec(axis))
  return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])


def to_host(tree: Any) -> Any:
  """Full numpy copies of every array in `tree`, on every process (a collective)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (no-op in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def place_encoding(leaf: Encoding, weight_sharding: Any) -> Encoding:
  """`leaf` with its arrays moved to `encoding_shardings` (unchanged unless the weight was
  laid out with a `NamedSharding`, e.g. a host-side SVD's factors go back onto the mesh)."""
  if not isinstance(weight_sharding, NamedSharding):
    return leaf
  want = encoding_shardings(leaf, weight_sharding)

  def place(node, prefix=""):
    fields = {}
    for name, child in node.children().items():
      if isinstance(child, Encoding):
        fields[name] = place(child, f"{prefix}{name}.")
      elif child is not None:
        fields[name] = jax.device_put(child, want[prefix + name])
    return dataclasses.replace(node, **fields)

  return place(leaf)
