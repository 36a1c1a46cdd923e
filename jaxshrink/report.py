"""Per-leaf size and sparsity statistics, shared by `inspect`, `demo` and export.

>>> rep = tree_report({"Dense_0": {"kernel": jnp.ones((64, 10))}})
>>> rep.total_bytes, rep.float32_bytes, rep.ratio
(2560, 2560, 1.0)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxshrink import encoding
from jaxshrink.model import accepts_models
from jaxshrink.tree import flatten


@dataclasses.dataclass(frozen=True)
class LeafReport:
  """What one leaf costs.

  Attributes:
    path: `/`-joined leaf path.
    shape: logical shape.
    encoding: encoding name (`int8`, `cast`, ...) or the dtype of a dense leaf.
    description: human detail, e.g. `bfloat16 storage`.
    bits_per_weight: stored bits divided by logical element count.
    sparsity: fraction of exact zeros in the logical (materialized) array.
    bytes: stored bytes of this leaf.
    dtype: the logical dtype (what the model computes with: `float32`, `bfloat16`, ...).
  """

  path: str
  shape: tuple[int, ...]
  encoding: str
  description: str
  bits_per_weight: float
  sparsity: float
  bytes: int
  dtype: str = "float32"

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def float32_bytes(self) -> int:
    return 4 * self.size

  @property
  def native_bytes(self) -> int:
    """Bytes of the uncompressed leaf in its own dtype (2 per weight for a bf16 model)."""
    return _itemsize(self.dtype) * self.size

  def to_json(self) -> dict[str, Any]:
    return {
      "path": self.path,
      "shape": list(self.shape),
      "encoding": self.encoding,
      "description": self.description,
      "bits_per_weight": round(self.bits_per_weight, 4),
      "sparsity": round(self.sparsity, 6),
      "bytes": self.bytes,
      "dtype": self.dtype,
    }

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> LeafReport:
    return cls(
      path=d["path"],
      shape=tuple(d["shape"]),
      encoding=d["encoding"],
      description=d.get("description", d["encoding"]),
      bits_per_weight=float(d["bits_per_weight"]),
      sparsity=float(d["sparsity"]),
      bytes=int(d["bytes"]),
      dtype=str(d.get("dtype", "float32")),
    )


@dataclasses.dataclass(frozen=True)
class TreeReport:
  """Per-leaf reports plus totals.

  `ratio` is float32 bytes over stored bytes, the common yardstick; `native_ratio` is the
  uncompressed bytes in each leaf's own dtype over stored bytes, what compressing this model
  really saves (for a bf16 model int8 saves 2x, not the 4x `ratio` shows).
  """

  layers: tuple[LeafReport, ...]

  @property
  def total_bytes(self) -> int:
    return sum(leaf.bytes for leaf in self.layers)

  @property
  def float32_bytes(self) -> int:
    return sum(leaf.float32_bytes for leaf in self.layers)

  @property
  def ratio(self) -> float:
    return self.float32_bytes / max(self.total_bytes, 1)

  @property
  def native_bytes(self) -> int:
    return sum(leaf.native_bytes for leaf in self.layers)

  @property
  def native_ratio(self) -> float:
    return self.native_bytes / max(self.total_bytes, 1)

  @property
  def all_float32(self) -> bool:
    return all(leaf.dtype == "float32" for leaf in self.layers)

  @property
  def compressed(self) -> bool:
    """Whether any leaf is stored compressed (a dense leaf's encoding is its dtype's name)."""
    return any(leaf.encoding != leaf.dtype for leaf in self.layers)

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.total_bytes / max(self.num_params, 1)

  @property
  def num_params(self) -> int:
    return sum(leaf.size for leaf in self.layers)

  def to_json(self) -> dict[str, Any]:
    return {
      "layers": [leaf.to_json() for leaf in self.layers],
      "total_bytes": self.total_bytes,
      "float32_bytes": self.float32_bytes,
      "ratio": round(self.ratio, 4),
      "native_bytes": self.native_bytes,
      "native_ratio": round(self.native_ratio, 4),
    }

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> TreeReport:
    return cls(layers=tuple(LeafReport.from_json(leaf) for leaf in d["layers"]))

  def table(self, title: str | None = None):
    """A `rich.table.Table` with one row per leaf and a totals row."""
    from rich.table import Table

    table = Table(title=title, show_footer=True)
    table.add_column("path", footer="total", no_wrap=True)
    table.add_column("shape", no_wrap=True)
    table.add_column("encoding")
    table.add_column("bits/weight", justify="right", footer=f"{self.bits_per_weight:.2f}")
    table.add_column("sparsity", justify="right")
    table.add_column("bytes", justify="right", footer=format_bytes(self.total_bytes))
    table.add_column("vs float32", justify="right", footer=f"{self.ratio:.2f}x")
    native = not self.all_float32  # a bf16/f16 model: also the saving against its own dtype
    if native:
      table.add_column("vs own dtype", justify="right", footer=f"{self.native_ratio:.2f}x")
    for leaf in self.layers:
      row = [
        leaf.path,
        "x".join(map(str, leaf.shape)) or "scalar",
        leaf.description,
        f"{leaf.bits_per_weight:.2f}",
        f"{leaf.sparsity:.1%}",
        format_bytes(leaf.bytes),
        f"{leaf.float32_bytes / max(leaf.bytes, 1):.2f}x",
      ]
      if native:
        row.append(f"{leaf.native_bytes / max(leaf.bytes, 1):.2f}x ({leaf.dtype})")
      table.add_row(*row)
    return table


def _itemsize(dtype: str) -> int:
  try:
    return np.dtype(dtype).itemsize
  except TypeError:  # bfloat16 and the fp8 types are ml_dtypes names
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, dtype)).itemsize


def _sparsity(leaf: Any) -> float:
  dense = leaf.materialize() if isinstance(leaf, encoding.Encoding) else leaf
  dense = np.asarray(jax.device_get(dense))
  if dense.size == 0:
    return 0.0
  return float(np.count_nonzero(dense == 0)) / dense.size


def leaf_report(path: str, leaf: Any) -> LeafReport:
  nbytes = encoding.leaf_nbytes(leaf)
  shape = encoding.logical_shape(leaf)
  size = int(np.prod(shape, dtype=np.int64))
  return LeafReport(
    path=path,
    shape=shape,
    encoding=encoding.encoding_name(leaf),
    description=encoding.describe_leaf(leaf),
    bits_per_weight=8.0 * nbytes / max(size, 1),
    sparsity=_sparsity(leaf),
    bytes=nbytes,
    dtype=encoding.logical_dtype(leaf),
  )


@accepts_models(result="as_is")
def tree_report(tree: Any) -> TreeReport:
  """Stats for every leaf of a (compressed) parameter tree, or of a model's (`jaxshrink.model`)."""
  return TreeReport(layers=tuple(leaf_report(p, leaf) for p, leaf in flatten(tree).items()))


def console():
  """A rich Console; pipes and CI logs get 160 columns so tables keep whole leaf paths."""
  from rich.console import Console

  terminal = Console()
  return terminal if terminal.is_terminal else Console(width=160)


def format_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  raise AssertionError("unreachable")
