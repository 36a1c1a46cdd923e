"""Placing restored arrays on a mesh: `load(dir, shardings=shard_like(mesh, rules))`."""

from __future__ import annotations

import re
from collections.abc import Mapping

from jax.sharding import Mesh, NamedSharding, PartitionSpec


def shard_like(mesh: Mesh, rules: Mapping[str, PartitionSpec]):
  """A `shardings` function for `load`: the first rule whose regex fully matches a
  leaf path gives the PartitionSpec of that leaf's stored arrays.

  A spec is applied to a stored array of the same rank whose sharded dimensions
  divide evenly over the mesh axes; codes and masks keep their weight's layout
  that way. Any other array (a per-channel scale of lower rank, packed codes
  whose packed axis no longer divides) is replicated. Unmatched leaves are
  replicated too.

  >>> load("ckpt", shardings=shard_like(mesh, {".*kernel": P(None, "model")}))
  """
  compiled = [(re.compile(pattern), spec) for pattern, spec in rules.items()]
  replicated = NamedSharding(mesh, PartitionSpec())

  def fits(spec: PartitionSpec, shape: tuple[int, ...]) -> bool:
    if len(spec) != len(shape):
      return False
    for axes, dim in zip(spec, shape, strict=True):
      if axes is None:
        continue
      names = axes if isinstance(axes, tuple) else (axes,)
      count = 1
      for name in names:
        count *= mesh.shape[name]
      if dim % count:
        return False
    return True

  def sharding(path: str, field: str, shape: tuple[int, ...]):
    for pattern, spec in compiled:
      if pattern.fullmatch(path):
        return NamedSharding(mesh, spec) if fits(spec, shape) else replicated
    return replicated

  return sharding
