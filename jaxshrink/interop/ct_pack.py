"""compressed-tensors' dense int32 bit packing, in NumPy (no torch at export time).

compressed-tensors (`compressors/pack_quantized/helpers.py`, `pack_to_int32`) stores `b`-bit
signed codes as unsigned `code + 2^(b-1)` and packs them densely along one axis: element `i`
of each run of 32 occupies bits `[i*b, i*b + b)` of the run's `b` int32 words (little-endian
bit order, a code may straddle two words), the axis is zero-padded to whole runs and the
words cut to `ceil(n * b / 32)`. `pack_int32` reproduces it bit for bit (the tests compare it
with `pack_to_int32`), and `unpack_int32` inverts it for import.

>>> codes = np.array([[-8, 7, 0, 1]], np.int8)
>>> packed = pack_int32(codes, 4)
>>> packed.shape, packed.dtype, unpack_int32(packed, 4, 4).tolist()
((1, 1), dtype('int32'), [[-8, 7, 0, 1]])
"""

from __future__ import annotations

import math

import numpy as np

from jaxshrink.errors import InvalidValueError

RUN = 32  # codes per packing run: 32 codes of b bits fill exactly b int32 words


def packed_length(n: int, bits: int) -> int:
  """int32 words holding `n` codes of `bits` bits along the packed axis."""
  return math.ceil(n * bits / 32)


def _check_bits(bits: int) -> None:
  if not 1 <= bits <= 8:
    raise InvalidValueError(
      f"compressed-tensors packs codes of 1 to 8 bits into int32; got bits={bits}. Use 4 or 8."
    )


def pack_int32(codes: np.ndarray, bits: int, axis: int = 1) -> np.ndarray:
  """Packs signed `bits`-bit codes of a 2-D array into int32 along `axis` (0 or 1).

  Args:
    codes: integer codes in `[-2^(bits-1), 2^(bits-1) - 1]`, shape `(rows, cols)`.
    bits: code width, 1 to 8.
    axis: the packed axis; 1 for `weight_packed` `(N, K)`, 0 for a zero point `(N, G)`.

  Returns:
    int32 `(rows, ceil(cols * bits / 32))` for axis 1, `(ceil(rows * bits / 32), cols)` for 0.

  Raises:
    InvalidValueError: bits outside 1..8, a code outside the range, or not a matrix.
  """
  _check_bits(bits)
  codes = np.asarray(codes)
  if codes.ndim != 2 or axis not in (0, 1):
    raise InvalidValueError(
      f"pack_int32 packs a 2-D array along axis 0 or 1; got shape {codes.shape}, axis {axis}."
    )
  offset = 1 << (bits - 1)
  if codes.size and (int(codes.min()) < -offset or int(codes.max()) >= offset):
    raise InvalidValueError(
      f"Codes span [{int(codes.min())}, {int(codes.max())}], outside the {bits}-bit range "
      f"[{-offset}, {offset - 1}] that compressed-tensors packs."
    )
  values = codes.T if axis == 0 else codes
  rows, cols = values.shape
  runs = math.ceil(cols / RUN)
  # Unsigned 32-bit arithmetic: a left shift drops the bits that spill into the next word,
  # which the right shift below carries over (torch's int32 scatter-add does the same).
  u = np.zeros((rows, runs * RUN), np.uint32)
  u[:, :cols] = (values.astype(np.int32) + offset).astype(np.uint32)
  u = u.reshape(rows * runs, RUN)
  words = np.zeros((rows * runs, bits), np.uint32)
  for i in range(RUN):
    word, shift = divmod(i * bits, 32)
    words[:, word] |= u[:, i] << np.uint32(shift)
    if shift + bits > 32:
      words[:, word + 1] |= u[:, i] >> np.uint32(32 - shift)
  packed = words.view(np.int32).reshape(rows, runs * bits)[:, : packed_length(cols, bits)]
  return np.ascontiguousarray(packed.T if axis == 0 else packed)


def unpack_int32(packed: np.ndarray, bits: int, length: int, axis: int = 1) -> np.ndarray:
  """Inverse of `pack_int32`: int8 codes with `length` entries along `axis`.

  Raises:
    InvalidValueError: bits outside 1..8, a non-int32 or non-2-D input, or a packed axis whose
      length is not `ceil(length * bits / 32)`.
  """
  _check_bits(bits)
  packed = np.asarray(packed)
  if packed.dtype != np.int32 or packed.ndim != 2 or axis not in (0, 1):
    raise InvalidValueError(
      f"unpack_int32 takes a 2-D int32 array and axis 0 or 1; got {packed.dtype} "
      f"{packed.shape}, axis {axis}."
    )
  words = packed.T if axis == 0 else packed
  rows, nwords = words.shape
  if nwords != packed_length(length, bits):
    raise InvalidValueError(
      f"{length} codes of {bits} bits pack into {packed_length(length, bits)} int32 words; "
      f"got {nwords}."
    )
  runs = math.ceil(length / RUN)
  padded = np.zeros((rows, runs * bits), np.uint32)
  padded[:, :nwords] = words.view(np.uint32)
  padded = padded.reshape(rows * runs, bits)
  mask = np.uint32((1 << bits) - 1)
  out = np.empty((rows * runs, RUN), np.uint32)
  for i in range(RUN):
    word, shift = divmod(i * bits, 32)
    value = padded[:, word] >> np.uint32(shift)
    if shift + bits > 32:
      value |= padded[:, word + 1] << np.uint32(32 - shift)
    out[:, i] = value & mask
  codes = out.reshape(rows, runs * RUN)[:, :length].astype(np.int16) - (1 << (bits - 1))
  codes = codes.astype(np.int8)
  return np.ascontiguousarray(codes.T if axis == 0 else codes)
