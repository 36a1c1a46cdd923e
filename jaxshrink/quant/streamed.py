"""Weight-only matmuls for a few rows (decoding), reading the codes one chunk at a time.

A weight-only `QArray` multiplied by many rows (a batch of sentences) is decoded once and fed
to one float matmul: the decode is a small part of the work. At batch-1 decoding every weight
is read once per token, so the matmul is a stream over the weights and its speed is set by the
bytes it moves. Decoding the whole `(K, N)` matrix first writes a float copy four times the
size of int8 codes (eight times int4) and reads it back, which is slower than the float model.

`streamed_matmul` walks `K` in chunks of rows inside a `lax.scan`: each step decodes one
chunk (`chunk x N`, small enough to stay in cache) and adds its product to the accumulator,
so memory traffic is the codes themselves. Packed codes are never interleaved back into row
order: the input's columns are split the way the rows are packed instead (`x[:, j::per]`
meets the `j`-th code of every packed word). `qarray_matmul` takes this path for at most
`STREAM_ROWS` rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxshrink.errors import InvalidValueError
from jaxshrink.quant import packing
from jaxshrink.quant.qarray import QArray

# At most this many rows take the streamed path; more rows amortize one whole decode.
STREAM_ROWS = 16
# Rows of codes decoded per step: 256 x N float32 stays in a CPU's L2/L3 for N up to a few
# thousand, and is a whole number of groups for the usual group sizes (32 to 256). On 2 CPU
# cores, eight int8 2048 x 2048 layers at batch 1: 64 rows 0.9x float time, 256 rows 1.5x,
# 512 rows 1.4x; decoding the whole matrix first: 0.09x.
CHUNK = 256


def chunk_rows(q: QArray) -> int | None:
  """Rows per streamed step for `q`, or None when `q` cannot stream (then it is decoded).

  The largest of `CHUNK`, `CHUNK / 2`, `CHUNK / 4` that splits `K` into at least two steps of
  whole groups and whole packed words (a 384-wide kernel takes 128).
  """
  if q.layers is not None or q.format != "int" or q.act_bits is not None:
    return None
  if q.bits not in (8, *packing.PACKED_BITS):
    return None
  per = 1 if q.bits == 8 else packing.chunk(q.bits)[0]
  if q.group_size is not None and q.group_size % per:
    return None
  for chunk in (CHUNK, CHUNK // 2, CHUNK // 4):
    if q.group_size is not None and chunk % q.group_size:
      continue
    if q.k % chunk == 0 and chunk % per == 0 and q.k > chunk:
      return chunk
  return None


def _per_row(values: jax.Array, q: QArray, steps: int, chunk: int, per: int) -> jax.Array:
  """`(steps, chunk // per, N)` per-group values, one per packed row of each step."""
  if q.group_size is None:  # one value per output: the same for every row
    return jnp.broadcast_to(values.astype(jnp.float32)[None], (steps, 1, q.n))
  groups = values.astype(jnp.float32).reshape(steps, chunk // q.group_size, q.n)
  return jnp.repeat(groups, q.group_size // per, axis=1)


def streamed_matmul(x2d: jax.Array, q: QArray, dtype=jnp.float32) -> jax.Array:
  """`x2d (rows, K) @ dequantized(q) (K, N)` in float32, one chunk of `K` at a time.

  `q` is a weight-only integer `QArray` that `chunk_rows` accepts (not stacked); `dtype` is
  the dtype the chunks are decoded to and multiplied in (the activations' float dtype).

  >>> y = streamed_matmul(x[None], q)      # one token's activations, an int4 g128 kernel
  """
  chunk = chunk_rows(q)
  if chunk is None:
    raise InvalidValueError(f"This QArray ({q.describe()}) cannot stream; decode it instead.")
  rows = x2d.shape[0]
  steps = q.k // chunk
  bits = q.bits
  per, nbytes = (1, 1) if bits == 8 else packing.chunk(bits)
  words = chunk // per  # packed words (groups of `per` codes) per step
  codes = q.codes.reshape(steps, words * nbytes, q.n)
  # Input columns meeting the j-th code of each word: `(steps, per, rows, words)`.
  xs = x2d.astype(dtype).reshape(rows, steps, words, per).transpose(1, 3, 0, 2)
  scale = _per_row(q.scale, q, steps, chunk, per)
  if q.zero_point is None:
    zero = jnp.zeros((steps, 1, 1), jnp.float32)
  else:
    zero = _per_row(q.zero_point, q, steps, chunk, per)
  qmin = q.spec.qmin

  def step(acc, inputs):
    x_i, c_i, s_i, z_i = inputs
    if bits == 8:
      planes = [c_i.astype(jnp.float32)]
    else:
      b = c_i.astype(jnp.uint32).reshape(words, nbytes, q.n)
      word = b[:, 0]
      for byte in range(1, nbytes):
        word = word | (b[:, byte] << (8 * byte))
      mask = (1 << bits) - 1
      planes = [((word >> (j * bits)) & mask).astype(jnp.float32) + qmin for j in range(per)]
    for j, plane in enumerate(planes):
      w = plane if per_output else (plane - z_i) * s_i
      acc = acc + lax.dot(x_i[j], w.astype(dtype), preferred_element_type=jnp.float32)
    return acc, None

  # One symmetric scale per output: applied once to the sum, not to every decoded weight.
  per_output = q.group_size is None and q.zero_point is None
  acc, _ = lax.scan(step, jnp.zeros((rows, q.n), jnp.float32), (xs, codes, scale, zero))
  return acc * scale[0] if per_output else acc
