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

`LayerQuant` bundles a layer's weight `QuantSpec` with its activation bits; it is the one form
every per-layer setting takes. `as_layer_quant` is the one place shorthands become it: a bare
`QuantSpec`, an int `b` (`QuantSpec(bits=b)`) or None (keep the layer float).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxshrink.errors import InvalidTypeError, InvalidValueError

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
    """Raises `InvalidValueError` / `InvalidTypeError` naming `path` and the fix."""
    if self.format not in FORMATS:
      raise InvalidValueError(
        f"Quantization `format` must be one of {list(FORMATS)}; got {self.format!r} for "
        f"`{path}`. Use `int` for integer codes."
      )
    if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
      raise InvalidTypeError(f"Quantization `bits` must be an int; got {self.bits!r} for `{path}`.")
    if self.format == "int" and self.bits not in INT_BITS:
      raise InvalidValueError(
        f"Unsupported `bits`={self.bits} for `{path}`; integer quantization supports "
        f"{list(INT_BITS)}. Pick one of those (e.g. 4 for weight-only, 8 for W8A8)."
      )
    if self.format != "int" and self.bits != 8:
      raise InvalidValueError(
        f"Format `{self.format}` stores 8-bit codes; got `bits`={self.bits} for `{path}`. "
        "Set bits=8 or use format `int`."
      )
    if self.format != "int" and not self.symmetric:
      raise InvalidValueError(
        f"Format `{self.format}` is symmetric only; got symmetric=False for `{path}`. Use "
        "format `int` for a zero point."
      )
    if self.group_size is not None:
      if isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer)):
        raise InvalidTypeError(
          f"`group_size` must be an int or None; got {self.group_size!r} for `{path}`."
        )
      if self.group_size < 1:
        raise InvalidValueError(
          f"`group_size` must be >= 1 (or None for per-channel); got {self.group_size} for "
          f"`{path}`."
        )
    if self.rounding not in ROUNDINGS:
      raise InvalidValueError(
        f"`rounding` must be one of {list(ROUNDINGS)}; got {self.rounding!r} for `{path}`."
      )
    if self.rounding == "stochastic" and self.format != "int":
      raise InvalidValueError(
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


ACTIVATION_BITS = (None, 8, 4)


@dataclasses.dataclass(frozen=True)
class LayerQuant:
  """Settings of one group of layers.

  Attributes:
    spec: weight quantization; None keeps the layer in float.
    activation_bits: None for weight-only; 8 for W8A8 (integer path), 4 for W4A4 fake quant.
  """

  spec: QuantSpec | None
  activation_bits: int | None = None

  def validate(self, path: str = "<layer>") -> None:
    """Raises `InvalidValueError` naming `path` for an unsupported spec or activation width."""
    if self.spec is not None:
      self.spec.validate(path)
    if self.activation_bits not in ACTIVATION_BITS:
      raise InvalidValueError(
        f"`activation_bits` must be null (weight-only), 8 or 4; got {self.activation_bits!r} "
        f"for `{path}`."
      )


def as_layer_quant(setting: object, base: LayerQuant | None = None) -> LayerQuant:
  """The `LayerQuant` a per-layer setting stands for; the one place shorthands are converted.

  Args:
    setting: a `LayerQuant` (as is); a `QuantSpec` (weights; activation bits from `base`); an
      int `b`, shorthand for `QuantSpec(bits=b)` (activation bits from `base`); None (keep
      the layer float).
    base: the settings the shorthands inherit activation bits from (default: weight-only).

  Raises:
    InvalidTypeError: any other kind of setting.

  >>> layer = as_layer_quant(4, LayerQuant(QuantSpec(), activation_bits=8))
  >>> layer.spec.bits, layer.activation_bits
  (4, 8)
  """
  act = None if base is None else base.activation_bits
  if isinstance(setting, LayerQuant):
    return setting
  if setting is None:
    return LayerQuant(None)
  if isinstance(setting, QuantSpec):
    return LayerQuant(setting, act)
  if isinstance(setting, (int, np.integer)) and not isinstance(setting, bool):
    return LayerQuant(QuantSpec(bits=int(setting)), act)
  raise InvalidTypeError(
    f"A layer's quantization setting must be a LayerQuant, a QuantSpec, an int (weight bits) "
    f"or None (keep float); got {type(setting).__name__} {setting!r}."
  )
