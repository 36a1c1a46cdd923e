"""`LowRank`: a kernel stored as two factors `a @ b`.

The kernel is viewed as a `(K, N)` matrix with its contracting dims first
(`capture.kernel_matrix`), so a Dense kernel `(in, out)` is itself, a conv
kernel `(kh, kw, cin, cout)` is `(kh*kw*cin, cout)`. Storing `a (K, r)` and
`b (r, N)` costs `r (K + N)` instead of `K N`. Either factor may itself be an
`Encoding` (e.g. an int8 `QArray`): low-rank + int8.

>>> enc = LowRank.from_factors(jnp.ones((64, 8)), jnp.ones((8, 32)), shape=(64, 32))
>>> enc.rank, enc.nbytes, materialize(enc).shape
(8, 3072, (64, 32))
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.capture import from_matrix
from jaxshrink.encoding import Encoding, materialize, register_encoding
from jaxshrink.errors import InvalidValueError

# One default for every technique: every dim but the last (Dense `(in, out)`, conv HWIO,
# DenseGeneral `(..., out)`), the same axes quantization scales over.
from jaxshrink.quant.qarray import default_contract_dims as default_contract_dims


def matrix_shape(shape: tuple[int, ...], contract_dims: tuple[int, ...]) -> tuple[int, int]:
  """`(K, N)` of the kernel's matrix view."""
  k = int(np.prod([shape[d] for d in contract_dims], dtype=np.int64))
  n = int(np.prod(shape, dtype=np.int64)) // max(k, 1)
  return k, n


def _factor_dtype(x: Any) -> str:
  return x.dtype if isinstance(x, Encoding) else np.dtype(x.dtype).name


@register_encoding
class LowRank(Encoding):
  """A kernel as the product of two factors.

  Attributes:
    a: `(K, r)` left factor (array or nested `Encoding`).
    b: `(r, N)` right factor (array or nested `Encoding`).
    shape: logical kernel shape.
    dtype: logical dtype name.
    contract_dims: the kernel dims that make up `K`, in order (the rest make up `N`).
  """

  name: ClassVar[str] = "lowrank"
  array_fields: ClassVar[tuple[str, ...]] = ("a", "b")
  a: Any
  b: Any
  shape: tuple[int, ...]
  dtype: str
  contract_dims: tuple[int, ...]

  @classmethod
  def from_factors(
    cls,
    a: Any,
    b: Any,
    *,
    shape: tuple[int, ...],
    contract_dims: tuple[int, ...] | None = None,
    dtype: str | None = None,
    path: str = "<array>",
  ) -> LowRank:
    """Builds the encoding, checking the factor shapes against the kernel shape."""
    shape = tuple(int(d) for d in shape)
    contract_dims = (
      default_contract_dims(shape)
      if contract_dims is None
      else tuple(int(d) for d in contract_dims)
    )
    if sorted(set(contract_dims)) != sorted(contract_dims) or any(
      not 0 <= d < len(shape) for d in contract_dims
    ):
      raise InvalidValueError(
        f"`contract_dims` {contract_dims} at `{path}` must be distinct dims of the kernel shape "
        f"{shape}."
      )
    k, n = matrix_shape(shape, contract_dims)
    a_shape, b_shape = tuple(a.shape), tuple(b.shape)
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != b_shape[0]:
      raise InvalidValueError(
        f"low-rank factors at `{path}` must be (K, r) and (r, N); got {a_shape} and {b_shape}."
      )
    if (a_shape[0], b_shape[1]) != (k, n):
      raise InvalidValueError(
        f"low-rank factors at `{path}` give a ({a_shape[0]}, {b_shape[1]}) matrix but the kernel "
        f"{shape} with contract_dims {contract_dims} is ({k}, {n})."
      )
    dtype = _factor_dtype(a) if dtype is None else np.dtype(dtype).name
    return cls(a=a, b=b, shape=shape, dtype=dtype, contract_dims=contract_dims)

  @property
  def rank(self) -> int:
    return int(self.a.shape[1])

  @property
  def matrix_shape(self) -> tuple[int, int]:
    return matrix_shape(self.shape, self.contract_dims)

  def factors(self) -> tuple[jax.Array, jax.Array]:
    """Dense `(a, b)` in the logical dtype (nested encodings decoded)."""
    a, b = materialize(self.a), materialize(self.b)
    return a.astype(self.dtype), b.astype(self.dtype)

  def materialize(self) -> jax.Array:
    a, b = self.factors()
    m = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    return from_matrix(m, self.shape, self.contract_dims)

  def describe(self) -> str:
    k, n = self.matrix_shape
    inner = ""
    if isinstance(self.a, Encoding):
      inner = f", factors {self.a.describe()}"
    return f"rank {self.rank} of {min(k, n)}{inner}"


def quantize_factors(tree: Any, bits: int = 8) -> Any:
  """Quantizes both factors of every `LowRank` leaf (low-rank + intN).

  `a (K, r)` gets one scale per rank component, `b (r, N)` one per output
  channel (both contract over their first axis). Fine-tune before this: the
  integer codes are not trainable.

  >>> quantize_factors({"w": LowRank.from_factors(jnp.ones((8, 2)), jnp.ones((2, 4)),
  ...                                              shape=(8, 4))})["w"].a.name
  'qarray'
  """
  from jaxshrink.quant import QuantSpec, quantize
  from jaxshrink.tree import map_with_path

  spec = QuantSpec(bits=bits)
  spec.validate("low-rank factors")
  found = []

  def encode(path: str, leaf: Any) -> Any:
    if not isinstance(leaf, LowRank):
      return leaf
    found.append(path)
    if isinstance(leaf.a, Encoding) or isinstance(leaf.b, Encoding):
      raise InvalidValueError(f"the factors of `{path}` are already encoded ({leaf.describe()}).")
    a = quantize(leaf.a, spec, contract_dims=(0,), path=f"{path}/a")
    b = quantize(leaf.b, spec, contract_dims=(0,), path=f"{path}/b")
    return LowRank(a=a, b=b, shape=leaf.shape, dtype=leaf.dtype, contract_dims=leaf.contract_dims)

  out = map_with_path(encode, tree)
  if not found:
    raise InvalidValueError("quantize_factors found no LowRank leaf; run `factorize` first.")
  return out
