"""Quantized KV-cache entries: int8 or int4 keys and values with one scale per token and head.

A decoder's KV cache grows with every token and every sequence of the batch; at long contexts
it outweighs the weights. Each cached key (and value) vector of one token and one key/value
head is stored as symmetric integer codes with its own scale, `absmax / qmax`, so one outlier
token or head never coarsens the others. int8 codes take one byte per element, int4 codes two
per byte (packed along the head dimension); the scales are bfloat16 (8 exponent bits: any
activation range fits). Against a bfloat16 cache that is `(D + 2) / 2D` of the bytes for int8
(0.53 at head size 32 and 0.52 at 64) and `(D / 2 + 2) / 2D` for int4.

The codes are never decoded to a full-precision copy of the cache. The scale of key `s`
multiplies every product of a query with that key, so attention scores are `(q . codes_s) *
scale_s`; the scale of value `s` goes into the attention weight of position `s` before the
weighted sum of value codes.

>>> entry = empty(batch=1, max_len=64, kv_heads=2, head_dim=32, bits=8)
>>> entry = write(entry, keys, start=0)           # keys (1, T, 2, 32) float
>>> scores = scores_with(q, entry)                # q (1, T, 2, group, 32) -> (1, 2, group, T, 64)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxshrink.errors import InvalidValueError

KV_BITS = (4, 8)
SCALE_DTYPE = jnp.bfloat16


class QuantizedKV(NamedTuple):
  """One layer's cached keys (or values) as codes and per-token, per-head scales.

  Attributes:
    codes: int8 `(B, S, kv_heads, D)`, or uint8 `(B, S, kv_heads, D // 2)` holding two int4
      codes per byte (element `2i` in the low nibble).
    scale: bfloat16 `(B, S, kv_heads, 1)`.
  """

  codes: jax.Array
  scale: jax.Array

  @property
  def bits(self) -> int:
    return 8 if self.codes.dtype == jnp.int8 else 4


def check_bits(bits: Any) -> int | None:
  """`bits` if it is a supported KV-cache width (or None: a float cache), else an error."""
  if bits is None:
    return None
  if isinstance(bits, bool) or bits not in KV_BITS:
    raise InvalidValueError(
      f"`kv_bits` must be one of {list(KV_BITS)} (or None for a float cache); got {bits!r}."
    )
  return int(bits)


def empty(batch: int, max_len: int, kv_heads: int, head_dim: int, bits: int) -> QuantizedKV:
  """An all-zero entry for `max_len` positions."""
  bits = check_bits(bits)
  if bits == 4 and head_dim % 2:
    raise InvalidValueError(f"An int4 KV cache packs pairs along the head size; got {head_dim}.")
  width, dtype = (head_dim, jnp.int8) if bits == 8 else (head_dim // 2, jnp.uint8)
  return QuantizedKV(
    jnp.zeros((batch, max_len, kv_heads, width), dtype),
    jnp.zeros((batch, max_len, kv_heads, 1), SCALE_DTYPE),
  )


def quantize(x: jax.Array, bits: int) -> QuantizedKV:
  """Codes and scales of `x` `(B, T, kv_heads, D)`: symmetric, one scale per token and head."""
  qmax = 127 if bits == 8 else 7
  x = x.astype(jnp.float32)
  scale = (jnp.max(jnp.abs(x), axis=-1, keepdims=True) / qmax).astype(SCALE_DTYPE)
  safe = jnp.where(scale == 0, 1.0, scale.astype(jnp.float32))
  codes = jnp.clip(jnp.round(x / safe), -qmax, qmax).astype(jnp.int8)
  if bits == 4:
    pairs = (codes + 8).astype(jnp.uint8).reshape(*codes.shape[:-1], -1, 2)
    codes = pairs[..., 0] | (pairs[..., 1] << 4)
  return QuantizedKV(codes, scale)


def codes_of(entry: QuantizedKV) -> jax.Array:
  """The integer codes as float32 `(B, S, kv_heads, D)` (int4 unpacked), without the scales."""
  if entry.bits == 8:
    return entry.codes.astype(jnp.float32)
  low = (entry.codes & 0xF).astype(jnp.float32) - 8.0
  high = (entry.codes >> 4).astype(jnp.float32) - 8.0
  return jnp.stack([low, high], axis=-1).reshape(*entry.codes.shape[:-1], -1)


def dequantize(entry: QuantizedKV) -> jax.Array:
  """float32 values of the entry (tests and inspection; attention never builds this)."""
  return codes_of(entry) * entry.scale.astype(jnp.float32)


def write_rows(cache: jax.Array, new: jax.Array, start: jax.Array | int) -> jax.Array:
  """`cache` `(B, S, ...)` with `new` `(B, T, ...)` at positions `start .. start+T-1`: `start`
  is () for every row, or (B,) one per row (prompts of different lengths)."""
  start = jnp.asarray(start)
  if start.ndim == 0:
    return lax.dynamic_update_slice(cache, new, (0, start) + (0,) * (cache.ndim - 2))
  put = lambda c, n, s: lax.dynamic_update_slice(c, n, (s,) + (0,) * (c.ndim - 1))  # noqa: E731
  return jax.vmap(put)(cache, new, start)


def write(entry: QuantizedKV, new: jax.Array, start: jax.Array | int) -> QuantizedKV:
  """The entry with `new` `(B, T, kv_heads, D)` quantized into positions `start .. start+T-1`
  (`start` () or (B,), as `write_rows`)."""
  q = quantize(new, entry.bits)
  return QuantizedKV(
    write_rows(entry.codes, q.codes, start), write_rows(entry.scale, q.scale, start)
  )


def scores_with(q: jax.Array, keys: QuantizedKV) -> jax.Array:
  """`q . k` for grouped queries `q` `(B, T, kv_heads, group, D)` against every cached key:
  `(B, kv_heads, group, T, S)` float32, each key's scale applied to its products."""
  raw = jnp.einsum("btkgd,bskd->bkgts", q.astype(jnp.float32), codes_of(keys))
  scale = keys.scale[..., 0].astype(jnp.float32)  # (B, S, kv_heads)
  return raw * jnp.transpose(scale, (0, 2, 1))[:, :, None, None, :]


def mix_with(weights: jax.Array, values: QuantizedKV) -> jax.Array:
  """`sum_s weights_s v_s` for attention weights `(B, kv_heads, group, T, S)`:
  `(B, T, kv_heads, group, D)` float32, each value's scale folded into its weight."""
  scale = jnp.transpose(values.scale[..., 0].astype(jnp.float32), (0, 2, 1))  # (B, kvh, S)
  scaled = weights.astype(jnp.float32) * scale[:, :, None, None, :]
  return jnp.einsum("bkgts,bskd->btkgd", scaled, codes_of(values))


def nbytes_per_token(entry: QuantizedKV) -> int:
  """Bytes one cached position of this entry takes (codes and scales, every head)."""
  per = lambda a: a.dtype.itemsize * a.shape[2] * a.shape[3]  # noqa: E731
  return per(entry.codes) + per(entry.scale)
