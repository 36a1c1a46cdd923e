"""Checkpoint bytes of every encoding against its information limit, on one 256x1024 kernel.

The information limit of a leaf is what its encoding cannot do without: `bits x count` of the
codes or values, plus every scale and zero point at its stored width, plus the index metadata
(one bit per weight for a bitmask, `ceil(log2 C(m, n))` bits per group for N:M). It is
computed from the encoding's logical parameters, not from the arrays the checkpoint holds;
`tests/test_export_limit.py` imports this definition and these encodings to bound the stored
bytes (within 5%, at most 2 KiB of metadata). Each encoding is saved as a one-leaf
checkpoint; the suite records the limit, the stored array bytes from the manifest and every
byte on disk.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np

from jaxshrink import export
from jaxshrink.bench import Record
from jaxshrink.encoding import Encoding
from jaxshrink.lowrank import LowRank, quantize_factors
from jaxshrink.quant import QArray, QuantSpec, quantize
from jaxshrink.sparsity.encodings import BitmaskSparse, NMSparse, _values_encoder

SUITE = "information_limit"
DESCRIPTION = (
  "Every encoding of one 256x1024 float32 kernel (1 MiB, seeded normal) saved as a one-leaf "
  "checkpoint: `value` is the stored array bytes (from the manifest), `reference_value` the "
  "information limit (codes at their bit width, scales and zero points at their stored width, "
  "index metadata at its entropy: 1 bit per weight for a bitmask, ceil(log2 C(m, n)) bits per "
  "N:M group); `disk_bytes` counts every file, manifest and orbax metadata included."
)
K, N = 256, 1024


def limit_bits(enc) -> int:
  """The information limit of one (possibly nested) leaf, in bits."""
  if not isinstance(enc, Encoding):
    return 8 * np.dtype(enc.dtype).itemsize * int(np.prod(enc.shape))
  if isinstance(enc, QArray):
    groups = math.ceil(enc.k / enc.group_size) if enc.group_size else 1
    scales = groups * enc.n * 8 * np.dtype(enc.scale.dtype).itemsize
    zero_points = 0 if enc.zero_point is None else groups * enc.n * enc.bits
    return enc.bits * enc.k * enc.n + scales + zero_points
  if isinstance(enc, BitmaskSparse):
    return enc.size + limit_bits(enc.values)
  if isinstance(enc, NMSparse):
    groups = enc.size // enc.m
    return groups * math.ceil(math.log2(math.comb(enc.m, enc.n))) + limit_bits(enc.values)
  if isinstance(enc, LowRank):
    return limit_bits(enc.a) + limit_bits(enc.b)
  raise TypeError(f"No information limit is defined for `{type(enc).__name__}`.")


def _lowrank(w, rank=64):
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  root = np.sqrt(s[:rank])
  return LowRank.from_factors(u[:, :rank] * root, root[:, None] * vt[:rank], shape=w.shape)


def _sparse90(w):
  return w * (np.abs(w) > np.quantile(np.abs(w), 0.9))


ENCODINGS = {
  "int8 per-channel": lambda w: quantize(w, QuantSpec(bits=8)),
  "int4 g32": lambda w: quantize(w, QuantSpec(bits=4, group_size=32)),
  "int4 g128": lambda w: quantize(w, QuantSpec(bits=4, group_size=128)),
  "int4 g128 asymmetric (int8 zero points)": lambda w: quantize(
    w, QuantSpec(bits=4, group_size=128, symmetric=False)
  ),
  "int3 g128": lambda w: quantize(w, QuantSpec(bits=3, group_size=128)),
  "int2 g128": lambda w: quantize(w, QuantSpec(bits=2, group_size=128)),
  "bitmask 90% sparse": lambda w: BitmaskSparse.encode(_sparse90(w)),
  "bitmask 90% + int8": lambda w: BitmaskSparse.encode(
    _sparse90(w), values_encoder=_values_encoder(8, "w")
  ),
  "2:4": lambda w: NMSparse.encode(w, 2, 4, axis=0),
  "2:4 + int4": lambda w: NMSparse.encode(w, 2, 4, axis=0, values_encoder=_values_encoder(4, "w")),
  "low-rank r64": _lowrank,
  "low-rank r64 + int8": lambda w: quantize_factors({"w": _lowrank(w)})["w"],
}


def run() -> list[Record]:
  kernel = np.asarray(jax.random.normal(jax.random.key(0), (K, N)), np.float32)
  records = []
  tmp = Path(tempfile.mkdtemp(prefix="jaxshrink-limit-"))
  try:
    for name, encode in ENCODINGS.items():
      enc = encode(kernel)
      directory = export.save(tmp / f"ck{len(records)}", {"dense": {"kernel": enc}})
      limit = limit_bits(enc) / 8
      stored = export.read_manifest(directory)["totals"]["total_bytes"]
      disk = export.disk_bytes(directory)
      records.append(
        Record(SUITE, f"kernel {K}x{N}", name, "stored bytes", float(stored), limit, stored,
               kernel.nbytes, None, {"disk_bytes": disk, "metadata_bytes": disk - stored,
                                     "stored_vs_limit": round(stored / limit, 4)})
      )  # fmt: skip
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return records


def summarize(records: list[Record]) -> str:
  """The largest stored/limit ratio and the most metadata bytes over the encodings."""
  worst = max(records, key=lambda r: r.extra["stored_vs_limit"])
  heaviest = max(records, key=lambda r: r.extra["metadata_bytes"])
  return (
    f"Stored arrays are at most {worst.extra['stored_vs_limit']:.3f}x the information limit "
    f"({worst.method}); manifest and orbax metadata add at most "
    f"{heaviest.extra['metadata_bytes']} bytes ({heaviest.method})."
  )
