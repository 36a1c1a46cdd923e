"""Dense bit packing of low-bit integer codes along the contraction axis.

Codes of `b` bits (b = 2, 3, 4) are stored as unsigned `code - qmin` in `uint8` bytes, packed
along `K` (rows) so a column's codes stay together: `c = lcm(b, 8) / b` consecutive rows fill
`lcm(b, 8) / 8` bytes. So 4-bit codes are nibble-packed two per byte (row `2i` in the low
nibble), 2-bit codes four per byte, and 3-bit codes eight per three bytes. Unpacking is a few
shifts and masks that XLA fuses into the consumer inside `jit`.

>>> codes = jnp.array([[-7], [7], [0]], jnp.int32)
>>> packed = pack_codes(codes, bits=4, qmin=-7)
>>> packed.shape, packed.dtype, unpack_codes(packed, bits=4, qmin=-7, k=3).ravel().tolist()
((2, 1), dtype('uint8'), [-7, 7, 0])
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxshrink.errors import InvalidValueError

PACKED_BITS = (2, 3, 4)


def chunk(bits: int) -> tuple[int, int]:
  """(codes, bytes) per packing chunk: (2, 1) for 4-bit, (4, 1) for 2-bit, (8, 3) for 3-bit."""
  if bits not in PACKED_BITS:
    raise InvalidValueError(f"Bit packing supports bits in {list(PACKED_BITS)}; got {bits}.")
  total = math.lcm(bits, 8)
  return total // bits, total // 8


def packed_rows(k: int, bits: int) -> int:
  """Rows of the packed `uint8` array for `k` code rows."""
  codes, nbytes = chunk(bits)
  return math.ceil(k / codes) * nbytes


@functools.partial(jax.jit, static_argnames=("bits", "qmin"))
def pack_codes(codes: jax.Array, *, bits: int, qmin: int) -> jax.Array:
  """Packs int codes `(K, N)` in `[qmin, qmin + 2^bits - 1]` into `uint8 (packed_rows, N)`."""
  per, nbytes = chunk(bits)
  k, n = codes.shape
  rows = math.ceil(k / per)
  u = (codes.astype(jnp.int32) - qmin).astype(jnp.uint32)
  u = jnp.pad(u, ((0, rows * per - k), (0, 0))).reshape(rows, per, n)
  shifts = (jnp.arange(per, dtype=jnp.uint32) * bits)[None, :, None]
  word = jnp.sum(u << shifts, axis=1, dtype=jnp.uint32)  # disjoint bits: sum == or
  byte_shifts = (jnp.arange(nbytes, dtype=jnp.uint32) * 8)[None, :, None]
  packed = (word[:, None, :] >> byte_shifts) & 0xFF
  return packed.astype(jnp.uint8).reshape(rows * nbytes, n)


@functools.partial(jax.jit, static_argnames=("bits", "qmin", "k"))
def unpack_codes(packed: jax.Array, *, bits: int, qmin: int, k: int) -> jax.Array:
  """Inverse of `pack_codes`: int32 codes `(k, N)`."""
  per, nbytes = chunk(bits)
  n = packed.shape[1]
  rows = packed.shape[0] // nbytes
  b = packed.astype(jnp.uint32).reshape(rows, nbytes, n)
  byte_shifts = (jnp.arange(nbytes, dtype=jnp.uint32) * 8)[None, :, None]
  word = jnp.sum(b << byte_shifts, axis=1, dtype=jnp.uint32)
  shifts = (jnp.arange(per, dtype=jnp.uint32) * bits)[None, :, None]
  u = (word[:, None, :] >> shifts) & ((1 << bits) - 1)
  return u.reshape(rows * per, n)[:k].astype(jnp.int32) + qmin
