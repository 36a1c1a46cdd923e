"""`QuantSpec`: how one array is quantized (bits, symmetry, granularity, format, rounding).

A kernel is quantized in its matrix view `(K, N)` (see `jaxshrink.capture.kernel_matrix`):
`K` enumerates the contracting (input) elements, `N` the output channels.

- per-channel (`group_size=None`): one scale per output column, scale shape `(1, N)`;
- per-group (`group_size=g`): one scale per `g` rows along `K` and column, shape `(ceil(K/g), N)`;
- per-tensor (`per_tensor=True`): one scale, shape `(1, 1)`.

Integer codes are always signed: symmetric specs use `[-(2^(b-1) - 1), 2^(b-1) - 1]` (so `-x`
quantizes to `-q`, as in AQT), asymmetric specs use `[-2^(b-1), 2^(b-1) - 1]` with a signed zero
point. So every 8-bit code, and every zero point, fits an int8.

>>> QuantSpec(bits=4, group_size=128).qmax
7
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

INT_BITS = (8, 4, 3, 2)
FORMATS = ("int", "fp8_e4m3", "fp8_e5m2")
ROUNDINGS = ("nearest", "stochastic")
# ml_dtypes float8 types behind each fp8 format, and their largest finite value.
FP8_DTYPES = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How to quantize one array.

  Attributes:
    bits: code width: 8, 4, 3 or 2 for `format="int"`; 8 for the fp8 formats.
    symmetric: True for `x ≈ q * scale`; False adds a zero point: `x ≈ (q - zp) * scale`.
    group_size: None for per-channel; else rows of `K` sharing one scale (K is padded up to a
      multiple when it does not divide; a group larger than `K` falls back to per-channel).
    per_tensor: one scale for the whole array (overrides `group_size`).
    format: `int`, `fp8_e4m3` or `fp8_e5m2` (ml_dtypes float8 codes).
    rounding: `nearest`, or `stochastic` (then quantizing needs `key=`).
  """

  bits: int = 8
  symmetric: bool = True
  group_size: int | None = None
  per_tensor: bool = False
  format: str = "int"
  rounding: str = "nearest"

  def validate(self, path: str = "<array>") -> None:
    """Raises ValueError naming `path` and the fix for any unsupported setting."""
    if self.format not in FORMATS:
      raise ValueError(
        f"Quantization `format` must be one of {list(FORMATS)}; got {self.format!r} for "
        f"`{path}`. Use `int` for integer codes."
      )
    if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
      raise TypeError(f"Quantization `bits` must be an int; got {self.bits!r} for `{path}`.")
    if self.format == "int" and self.bits not in INT_BITS:
      raise ValueError(
        f"Unsupported `bits`={self.bits} for `{path}`; integer quantization supports "
        f"{list(INT_BITS)}. Pick one of those (e.g. 4 for weight-only, 8 for W8A8)."
      )
    if self.format != "int" and self.bits != 8:
      raise ValueError(
        f"Format `{self.format}` stores 8-bit codes; got `bits`={self.bits} for `{path}`. "
        "Set bits=8 or use format `int`."
      )
    if self.format != "int" and not self.symmetric:
      raise ValueError(
        f"Format `{self.format}` is symmetric only; got symmetric=False for `{path}`. Use "
        "format `int` for a zero point."
      )
    if self.group_size is not None:
      if isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer)):
        raise TypeError(
          f"`group_size` must be an int or None; got {self.group_size!r} for `{path}`."
        )
      if self.group_size < 1:
        raise ValueError(
          f"`group_size` must be >= 1 (or None for per-channel); got {self.group_size} for "
          f"`{path}`."
        )
    if self.rounding not in ROUNDINGS:
      raise ValueError(
        f"`rounding` must be one of {list(ROUNDINGS)}; got {self.rounding!r} for `{path}`."
      )
    if self.rounding == "stochastic" and self.format != "int":
      raise ValueError(
        f"Stochastic rounding applies to integer codes; got format `{self.format}` for "
        f"`{path}`. Use rounding `nearest`."
      )

  @property
  def qmin(self) -> int:
    """Smallest integer code."""
    half = 2 ** (self.bits - 1)
    return -(half - 1) if self.symmetric else -half

  @property
  def qmax(self) -> int:
    """Largest integer code (for fp8: the largest finite value of the format)."""
    if self.format != "int":
      return float(jnp.finfo(FP8_DTYPES[self.format]).max)
    return 2 ** (self.bits - 1) - 1

  @property
  def grouped(self) -> bool:
    return self.group_size is not None and not self.per_tensor

  @property
  def scale_dtype(self) -> str:
    """Storage dtype of scales.

    Grouped low-bit codes keep bfloat16 scales: float32 scales would cost 4/g bytes per weight
    (int4 g64: 0.5 + 0.0625 = 0.5625 B) against 2/g for bf16 (0.53125 B, within the 0.55 B
    budget even with an int8 zero point: 0.546875 B). bf16 keeps float32's range, so tiny
    scales never underflow; scales are rounded *up* to bf16, so nothing extra is clipped.
    """
    return "bfloat16" if self.grouped and self.format == "int" and self.bits <= 4 else "float32"

  def describe(self) -> str:
    """E.g. `int4 g128 sym`, `int8 per-channel asym`, `fp8_e4m3 per-tensor`."""
    kind = f"int{self.bits}" if self.format == "int" else self.format
    if self.per_tensor:
      gran = "per-tensor"
    elif self.group_size is None:
      gran = "per-channel"
    else:
      gran = f"g{self.group_size}"
    parts = [kind, gran, "sym" if self.symmetric else "asym"]
    if self.rounding == "stochastic":
      parts.append("stochastic")
    return " ".join(parts)
