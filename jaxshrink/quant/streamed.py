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
meets the `j`-th code of every packed word), and each group's scale and zero point are applied
to its partial sum rather than to every weight. `qarray_matmul` takes this path for at most
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
# Rows of codes decoded per step, for codes with one scale per column (per-channel): at most
# `CHUNK` rows, and at most about `CHUNK_ELEMENTS` weights for packed codes (`INT8_ELEMENTS`
# for int8), so a step's decoded rows stay in a CPU's L2/L3. On 2 CPU cores at batch 1: eight
# int8 2048 x 2048 layers run at 0.9x float speed with 64 rows, 1.5x with 256 and 1.4x with
# 512 (decoding the whole matrix first: 0.09x); an int4 1024 x 32000 head at 0.19x with 256
# rows and 1.0x with 16. llama-300m's int8 kernels (its 1024 x 32000 head taking 64 rows
# instead of 256) ran 1.8x faster at batch 1 and 2.3x at batch 8.
# Grouped codes take one group per step instead (see `chunk_rows`).
CHUNK = 256
CHUNK_ELEMENTS = 1 << 19
INT8_ELEMENTS = 1 << 20


def chunk_rows(q: QArray) -> int | None:
  """Rows per streamed step for `q`, or None when `q` cannot stream (then it is decoded).

  Grouped codes: one group per step, so each step is plain matmuls of the raw codes and the
  group's scale goes on its partial sum. Against steps of several groups (a batched matmul
  per step), llama-300m's kernels (K = 1024 or 2816, N up to 32000) ran 1.1x faster at
  batch 1 and 1.4x at batch 8 for int4 g128, 2.2x at batch 8 for int4 g32, and 1.7x at batch 8
  for int8 g128, on 2 CPU cores.

  Per-channel codes: the largest power of two from `CHUNK` down to `CHUNK / 4` (`CHUNK / 16`
  for packed codes) that splits `K` into at least two steps of whole packed words (a 384-row
  int8 kernel takes 128) and whose chunk holds at most `INT8_ELEMENTS` (int8) or
  `CHUNK_ELEMENTS` (packed) weights, else the smallest that splits `K`.
  """
  if q.layers is not None or q.format != "int" or q.act_bits is not None:
    return None
  if q.bits not in (8, *packing.PACKED_BITS):
    return None
  per = 1 if q.bits == 8 else packing.chunk(q.bits)[0]
  if q.group_size is not None:
    group = q.group_size
    return group if group % per == 0 and q.k % group == 0 and q.k > group else None
  valid = [
    chunk
    for chunk in (CHUNK >> i for i in range(3 if q.bits == 8 else 5))
    if q.k % chunk == 0 and chunk % per == 0 and q.k > chunk
  ]
  # Fewer, larger steps measured faster for int8 (one convert per weight), up to a larger size.
  limit = INT8_ELEMENTS if q.bits == 8 else CHUNK_ELEMENTS
  small = [chunk for chunk in valid if chunk * q.n <= limit]
  return small[0] if small else (valid[-1] if valid else None)


def streamed_matmul(x2d: jax.Array, q: QArray, dtype=jnp.float32) -> jax.Array:
  """`x2d (rows, K) @ dequantized(q) (K, N)` in float32, one chunk of `K` at a time.

  `q` is a weight-only integer `QArray` that `chunk_rows` accepts (not stacked); `dtype` is
  the dtype the codes are multiplied in (the activations' float dtype).

  >>> y = streamed_matmul(x[None], q)      # one token's activations, an int4 g128 kernel
  """
  chunk = chunk_rows(q)
  if chunk is None:
    raise InvalidValueError(f"This QArray ({q.describe()}) cannot stream; decode it instead.")
  if q.bits != 8 or q.group_size is not None:
    return _grouped(x2d, q, chunk, dtype)
  # Per-channel int8: each chunk's codes convert in one op and meet one plain matmul; the
  # scale and zero point of each output column go on the finished sum. (Grouping the partial
  # sums per step, as `_grouped` does, measured slower here on 2 CPU cores.)
  rows, steps = x2d.shape[0], q.k // chunk
  codes = q.codes.reshape(steps, chunk, q.n)
  xs = x2d.astype(dtype).reshape(rows, steps, chunk).transpose(1, 0, 2)

  def step(acc, inputs):
    x_i, c_i = inputs
    return acc + lax.dot(x_i, c_i.astype(dtype), preferred_element_type=jnp.float32), None

  acc, _ = lax.scan(step, jnp.zeros((rows, q.n), jnp.float32), (xs, codes))
  if q.zero_point is not None:
    zero = q.zero_point.astype(jnp.float32).reshape(1, q.n)
    acc = acc - zero * x2d.astype(jnp.float32).sum(-1, keepdims=True)
  return acc * q.scale.astype(jnp.float32).reshape(1, q.n)


def _grouped(x2d: jax.Array, q: QArray, chunk: int, dtype) -> jax.Array:
  """Packed codes (2, 3 or 4 bits) or grouped int8, one chunk of rows per step (a group, or
  for per-channel packed codes `chunk` rows): the raw codes meet the input columns they
  multiply, and the step's zero point and scale go on its `(rows, N)` partial sum (per-channel:
  once, on the finished sum), so the per-weight decode is a shift or mask and a conversion."""
  rows, bits = x2d.shape[0], q.bits
  steps = q.k // chunk
  per, nbytes = (1, 1) if bits == 8 else packing.chunk(bits)
  words = chunk // per
  codes = q.codes.reshape(steps, words * nbytes, q.n)
  x = x2d.astype(jnp.float32)
  # The products run in the activations' dtype (a bf16 model multiplies in bf16).
  xs = x2d.astype(dtype).reshape(rows, steps, words, per).transpose(1, 3, 0, 2)
  x_sums = x.reshape(rows, steps, chunk).sum(-1).transpose(1, 0)

  def per_step(values):
    values = jnp.asarray(values, jnp.float32)
    if q.group_size is None:
      return jnp.broadcast_to(values.reshape(1, -1), (steps, q.n))
    return values.reshape(steps, q.n)

  scale = per_step(q.scale)
  zero = scale * 0 if q.zero_point is None else per_step(q.zero_point)
  offset = 0.0 if bits == 8 else float(q.spec.qmin)  # packed codes are stored minus qmin
  per_output = q.group_size is None  # one scale per column: applied once, to the sum

  def step(acc, inputs):
    x_i, c_i, s_i, z_i, sum_i = inputs
    if bits == 8:
      planes = [c_i]
    else:
      b = c_i.astype(jnp.uint32).reshape(words, nbytes, q.n)
      word = b[:, 0]
      for byte in range(1, nbytes):
        word = word | (b[:, byte] << (8 * byte))
      mask = (1 << bits) - 1
      planes = [(word >> (j * bits)) & mask for j in range(per)]
    part = sum(
      lax.dot(x_i[j], plane.astype(dtype), preferred_element_type=jnp.float32)
      for j, plane in enumerate(planes)
    )
    if not per_output:
      part = (part + (offset - z_i)[None, :] * sum_i[:, None]) * s_i[None, :]
    return acc + part, None

  acc, _ = lax.scan(step, jnp.zeros((rows, q.n), jnp.float32), (xs, codes, scale, zero, x_sums))
  if per_output:
    acc = (acc + (offset - zero[0]) * x.sum(-1, keepdims=True)) * scale[0]
  return acc
