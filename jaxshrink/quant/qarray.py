"""`QArray`: a quantized array as a compressed leaf (codes + scales + optional zero points).

Storage of the codes, in the `(K, N)` matrix view of the logical array:

- 8-bit integer codes: `int8 (K, N)`;
- 4-bit: nibble-packed `uint8 (ceil(K/2), N)`; 3-bit: 8 codes per 3 bytes; 2-bit: 4 per byte
  (`jaxshrink.quant.packing`);
- fp8: `float8_e4m3fn` / `float8_e5m2 (K, N)`.

Scales are `(G, N)` float32, or bfloat16 for grouped codes of 4 bits or fewer (see
`QuantSpec.scale_dtype`); zero points are `int8 (G, N)`. An int4 g128 kernel therefore takes
0.5 + 2/128 = 0.516 bytes per weight in memory and on disk, and `materialize` unpacks it inside
`jit`, so only the packed form stays resident.

A kernel stacked on a leading layer axis (`nn.scan` / `nnx.scan` layers) is one `QArray`
with `layers=L`: every array field gains a leading axis of length `L`, so each layer has its
own codes, scales, zero points and activation scales, and `q[i]` is layer `i`'s `QArray`
(`stack` builds one from per-layer QArrays). `shape` is the stacked shape `(L, ...)`;
`contract_dims`, `k` and `n` describe one layer's kernel `shape[1:]`.

>>> q = quantize(jnp.ones((256, 64)), QuantSpec(bits=4, group_size=128))
>>> q.codes.shape, q.codes.dtype, round(q.bits_per_weight / 8, 4)
((128, 64), dtype('uint8'), 0.5156)
>>> s = stack([q, q]); s.shape, s.scale.shape, s[1].shape
((2, 256, 64), (2, 2, 64), (256, 64))
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.capture import from_matrix, kernel_matrix
from jaxshrink.encoding import Encoding, register_encoding
from jaxshrink.errors import InvalidTypeError, InvalidValueError
from jaxshrink.quant import numerics, packing
from jaxshrink.quant.spec import FP8_DTYPES, QuantSpec


def normalize_contract_dims(contract_dims, ndim: int, path: str = "<array>") -> tuple[int, ...]:
  """Non-negative, sorted, unique contracting axes; ValueError when one is out of range."""
  dims = (contract_dims,) if isinstance(contract_dims, (int, np.integer)) else tuple(contract_dims)
  out = []
  for d in dims:
    if not -ndim <= int(d) < ndim:
      raise InvalidValueError(
        f"Contracting axis {d} is out of range for `{path}` of rank {ndim} (valid: "
        f"{-ndim}..{ndim - 1}). Pass `contract_dims` naming the kernel's input axes, e.g. (0,) "
        "for a Dense kernel or (0, 1, 2) for a 2-D conv kernel."
      )
    out.append(int(d) % ndim)
  if len(set(out)) != len(out) or not out:
    raise InvalidValueError(
      f"`contract_dims` must be distinct and non-empty for `{path}`; got {dims}."
    )
  return tuple(sorted(out))


def default_contract_dims(shape: tuple[int, ...]) -> tuple[int, ...]:
  """All axes but the last (Dense `(in, out)`, Conv `(kh, kw, cin, cout)`); (0,) for vectors."""
  return tuple(range(max(len(shape) - 1, 1)))


@register_encoding
class QArray(Encoding):
  """Quantized array: codes, scales, optional zero points and per-input-row scales.

  Attributes:
    codes: int8 / packed uint8 / float8, see the module docstring.
    scale: `(G, N)` float32 or bfloat16 step sizes.
    zero_point: `(G, N)` int8 or None (symmetric).
    input_scale: float32 `(K,)` or None. The logical matrix is `dequant(codes) / input_scale`
      (per row): AWQ (weight-only) and SmoothQuant (W8A8: the activation `x / input_scale` is
      quantized, the weight is stored as `W * input_scale`).
    bits, symmetric, group_size, per_tensor, format: the spec actually applied (`group_size`
      is None when a too-large group fell back to per-channel; `note` says so).
    shape, dtype: logical shape and dtype name.
    contract_dims: the logical array's contracting axes; `k`, `n`: matrix view size.
    note: what was adapted (e.g. a group fallback), shown by `describe()`.
    act_bits: None for weight-only; else the bits of the activations that meet this kernel on
      the integer path (W8A8: 8).
    act_scale: float32 `(1,)` static activation scale from calibration (of `x / input_scale`
      when `input_scale` is set), or None for dynamic per-token scales.
    table: True for an embedding table `(vocab, dim)` that the model reads by gather, stored
      with `contract_dims == (1,)`: its matrix view is `(dim, vocab)`, so each token row has
      its own scale (or `dim / group_size` scales, grouped along the row) and a lookup decodes
      only the gathered columns (`jaxshrink.quant.serve.gather_rows`). The same codes serve a
      tied output head, whose matmul contracts `dim`.
    layers: None, or the length of the leading layer axis of a stacked kernel (see the
      module docstring); `q[i]` is one layer.
  """

  name: ClassVar[str] = "qarray"
  array_fields: ClassVar[tuple[str, ...]] = (
    "codes",
    "scale",
    "zero_point",
    "input_scale",
    "act_scale",
  )
  codes: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None
  input_scale: jax.Array | None
  bits: int
  symmetric: bool
  group_size: int | None
  per_tensor: bool
  format: str
  shape: tuple[int, ...]
  dtype: str
  contract_dims: tuple[int, ...]
  k: int
  n: int
  note: str = ""
  act_bits: int | None = None
  act_scale: jax.Array | None = None
  table: bool = False
  layers: int | None = None

  def __getitem__(self, index: Any) -> QArray:
    """Layer `index` of a stacked QArray (an int, or a traced int32 scalar)."""
    if self.layers is None:
      raise InvalidTypeError(
        f"Only a stacked QArray (`layers` set) can be indexed, by layer; this one has shape "
        f"{self.shape} and no layer axis. Use `materialize()` for its values."
      )
    if isinstance(index, (int, np.integer)) and not -self.layers <= int(index) < self.layers:
      raise IndexError(f"Layer {index} is out of range for a QArray of {self.layers} layers.")
    pick = {f: None if getattr(self, f) is None else getattr(self, f)[index]
            for f in self.array_fields}  # fmt: skip
    return dataclasses.replace(self, **pick, shape=self.shape[1:], layers=None)

  def _layer_template(self) -> QArray:
    """The stacked arrays with one layer's static fields, for `jax.vmap` over layers."""
    return dataclasses.replace(self, shape=self.shape[1:], layers=None)

  @property
  def spec(self) -> QuantSpec:
    return QuantSpec(
      bits=self.bits,
      symmetric=self.symmetric,
      group_size=self.group_size,
      per_tensor=self.per_tensor,
      format=self.format,
    )

  @classmethod
  def from_codes(
    cls,
    codes_2d: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array | None,
    spec: QuantSpec,
    *,
    shape,
    dtype,
    contract_dims,
    input_scale: jax.Array | None = None,
    note: str = "",
  ) -> QArray:
    """Packs `(K, N)` codes (int32 in `[qmin, qmax]`, or float8) into a QArray."""
    k, n = codes_2d.shape
    if spec.format != "int":
      codes = codes_2d.astype(FP8_DTYPES[spec.format])
    elif spec.bits == 8:
      codes = codes_2d.astype(jnp.int8)
    else:
      codes = packing.pack_codes(codes_2d, bits=spec.bits, qmin=spec.qmin)
    group = spec.group_size if spec.grouped and spec.group_size <= k else None
    if spec.grouped and group is None and not note:
      note = f"g{spec.group_size} > K={k}: per-channel"
    return cls(
      codes=codes,
      scale=scale.astype(spec.scale_dtype),
      zero_point=None if zero_point is None else zero_point.astype(jnp.int8),
      input_scale=None if input_scale is None else input_scale.astype(jnp.float32),
      bits=int(spec.bits),
      symmetric=bool(spec.symmetric),
      group_size=None if group is None else int(group),
      per_tensor=bool(spec.per_tensor),
      format=spec.format,
      shape=tuple(int(d) for d in shape),
      dtype=np.dtype(dtype).name,
      contract_dims=tuple(int(d) for d in contract_dims),
      k=int(k),
      n=int(n),
      note=note,
    )

  def unpacked_codes(self) -> jax.Array:
    """int32 `(K, N)` codes (float32 values for fp8 formats); `(L, K, N)` when stacked."""
    if self.layers is not None:
      return jax.vmap(QArray.unpacked_codes)(self._layer_template())
    if self.format != "int":
      return self.codes.astype(jnp.float32)
    if self.bits == 8:
      return self.codes.astype(jnp.int32)
    return packing.unpack_codes(self.codes, bits=self.bits, qmin=self.spec.qmin, k=self.k)

  def dequantized_matrix(self, *, with_input_scale: bool = True) -> jax.Array:
    """float32 `(K, N)` view of the logical array; `(L, K, N)` when stacked."""
    if self.layers is not None:
      return jax.vmap(lambda q: q.dequantized_matrix(with_input_scale=with_input_scale))(
        self._layer_template()
      )
    w = numerics.dequantize_codes(self.unpacked_codes(), self.scale, self.zero_point, self.spec)
    if with_input_scale and self.input_scale is not None:
      w = w / self.input_scale[:, None]
    return w

  def materialize(self) -> jax.Array:
    return _materialize(self)

  def describe(self) -> str:
    text = self.spec.describe()
    if self.table:  # one scale per token row (or per group of it), not per output channel
      gran = "per-channel" if self.group_size is None else f"g{self.group_size}"
      text = text.replace(gran, "per-row" if self.group_size is None else f"{gran} per-row")
    if self.act_bits is not None:
      kind = "static" if self.act_scale is not None else "dynamic"
      text += f" act int{self.act_bits} {kind}"
    if self.input_scale is not None:
      text += " +input_scale"
    if self.layers is not None:
      text += f" x{self.layers} layers"
    return f"{text} ({self.note})" if self.note else text


@jax.jit
def _materialize(q: QArray) -> jax.Array:
  # One compiled decode (inlined when called inside the user's jit).
  if q.layers is not None:
    return jax.vmap(_materialize)(q._layer_template())
  w = from_matrix(q.dequantized_matrix(), q.shape, q.contract_dims)
  return w.astype(q.dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize_matrix(x, spec: QuantSpec, dims: tuple[int, ...], group, key):
  w2d = kernel_matrix(x, dims)
  scale, zp = numerics._qparams(w2d, spec, group)
  return w2d, scale, zp, numerics.quantize_codes(w2d, scale, zp, spec, key=key)


def stack(layers: Sequence[QArray]) -> QArray:
  """One stacked `QArray` (`layers=L`) from `L` per-layer QArrays of one kernel shape and spec.

  Raises:
    ValueError: no layers, or layers that differ in shape, spec or layout.
  """
  layers = list(layers)
  if not layers:
    raise InvalidValueError("`stack` needs at least one per-layer QArray.")
  first = layers[0]
  if first.layers is not None:
    raise InvalidValueError("`stack` takes per-layer QArrays; these are already stacked.")
  same = ("bits", "symmetric", "group_size", "per_tensor", "format", "shape", "dtype",
          "contract_dims", "k", "n", "act_bits", "table")  # fmt: skip
  for i, q in enumerate(layers):
    differ = [f for f in same if getattr(q, f) != getattr(first, f)]
    present = [
      f for f in first.array_fields if (getattr(q, f) is None) != (getattr(first, f) is None)
    ]
    if differ or present:
      raise InvalidValueError(
        f"Layer {i} of the stack differs from layer 0 in {', '.join(differ + present)}; a "
        "stacked QArray holds layers of one shape and spec."
      )
  notes = [q.note for q in layers]
  note = (
    notes[0] if len(set(notes)) == 1 else "; ".join(f"layer {i}: {n}" for i, n in enumerate(notes))
  )
  arrays = {f: None if getattr(first, f) is None else jnp.stack([getattr(q, f) for q in layers])
            for f in first.array_fields}  # fmt: skip
  return dataclasses.replace(
    first, **arrays, shape=(len(layers), *first.shape), layers=len(layers), note=note
  )


def quantize(
  x: jax.Array,
  spec: QuantSpec,
  *,
  contract_dims=None,
  path: str = "<array>",
  key: jax.Array | None = None,
) -> QArray:
  """Round-to-nearest (or stochastic) quantization of an array of any rank.

  Args:
    x: float array, e.g. a Dense kernel `(in, out)` or conv kernel `(kh, kw, cin, cout)`.
    spec: bits, symmetry, granularity, format and rounding.
    contract_dims: the axes that form `K` (the input side), as in `capture.Site`; default
      all axes but the last, as `quantize_params` and every technique use (Dense `(in, out)`
      -> (0,), conv `(kh, kw, cin, cout)` -> (0, 1, 2)).
    path: leaf path, named in warnings and errors.
    key: PRNG key, needed for stochastic rounding.

  Returns:
    A `QArray` whose `materialize()` has `x`'s shape and dtype.

  Raises:
    TypeError: `x` is not a float array. ValueError: bad spec, axis out of range, NaN/Inf.

  >>> quantize(jnp.ones((3, 3, 1, 8)), QuantSpec(bits=8)).codes.shape  # conv: K = 3*3*1
  (9, 8)
  """
  spec.validate(path)
  x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
  if x.ndim == 0:
    raise InvalidValueError(f"Cannot quantize the scalar `{path}`; exclude it from the rule.")
  if contract_dims is None:
    contract_dims = default_contract_dims(x.shape)
  dims = normalize_contract_dims(contract_dims, x.ndim, path)
  numerics.check_float_matrix(x.reshape(x.shape[0], -1), path)
  k = int(np.prod([x.shape[d] for d in dims]))
  group = numerics.effective_group_size(spec, k, path)
  if spec.rounding == "stochastic" and key is None:
    raise InvalidValueError("Stochastic rounding needs a PRNG `key=`; pass jax.random.key(seed).")
  _, scale, zp, codes = _quantize_matrix(x, spec, dims, group, key)
  return QArray.from_codes(codes, scale, zp, spec, shape=x.shape, dtype=x.dtype, contract_dims=dims)
