"""Reading compressed-tensors tensors back into `QArray` leaves: the inverse of
`compressed_tensors.compressed_state`, for checkpoints we or llm-compressor wrote.

A checkpoint is untrusted input: every config field and tensor is checked against the scheme
it claims (dtype, shape, code range) before anything is built, and a mismatch is a
`CheckpointError` naming the module and the field. Quantized modules come back as `QArray`s in
our `(K, N)` layout; every other tensor is returned as stored.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxshrink.errors import CheckpointError
from jaxshrink.interop.compressed_tensors import INT, NAIVE, PACKED, Scheme
from jaxshrink.interop.ct_pack import packed_length, unpack_int32
from jaxshrink.quant import packing
from jaxshrink.quant.qarray import QArray

# ---- import: compressed-tensors tensors -> QArray leaves (untrusted input) ----

_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "input_scale")


def _bad(where: str, problem: str) -> CheckpointError:
  return CheckpointError(
    f"compressed-tensors checkpoint: {where} {problem}. The checkpoint does not fit its "
    "`quantization_config`; re-export it (llm-compressor or `jaxshrink export --to "
    "compressed-tensors`). Nothing was loaded."
  )


def _unsupported(where: str, what: str) -> CheckpointError:
  return CheckpointError(
    f"compressed-tensors checkpoint: {where} is {what}, which jaxshrink does not import (it "
    "reads int W4A16/W8A16 `pack-quantized` and W8A8 `int-quantized` schemes). Dequantize it "
    "with compressed-tensors first, or load it in transformers/vLLM. Nothing was loaded."
  )


def _field(d: Any, key: str, kinds: tuple, where: str, default: Any = None) -> Any:
  if not isinstance(d, dict):
    raise _bad(where, f"is a {type(d).__name__}; expected a JSON object")
  value = d.get(key, default)
  if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
    raise _bad(f"{where}.{key}", f"is {value!r}; expected {'/'.join(k.__name__ for k in kinds)}")
  return value


def _read_scheme(group: Any, where: str, default_format: str) -> tuple[Scheme, str]:
  w = _field(group, "weights", (dict,), where)
  fmt = _field(group, "format", (str, type(None)), where) or default_format
  bits, kind = _field(w, "num_bits", (int,), where), _field(w, "type", (str,), where, "int")
  strategy, size = _field(w, "strategy", (str,), where), w.get("group_size")
  symmetric = _field(w, "symmetric", (bool,), where, True)
  if (fmt not in (PACKED, INT, NAIVE) or kind != "int" or bits not in (2, 3, 4, 8)
      or strategy not in ("group", "channel", "tensor") or w.get("dynamic", False) is not False
      or w.get("actorder") not in (None, "weight", "static")
      or group.get("output_activations") is not None):  # fmt: skip
    raise _unsupported(where, f"the scheme {json.dumps(group)[:300]}")
  if strategy == "group" and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
    raise _bad(f"{where}.weights.group_size", f"is {size!r}; a group strategy needs an int > 0")
  act, inputs = None, group.get("input_activations")
  if inputs is not None:
    mode = (_field(inputs, "strategy", (str,), where), inputs.get("dynamic"))
    if (inputs.get("num_bits") != 8 or inputs.get("type", "int") != "int"
        or inputs.get("symmetric") is not True
        or mode not in (("token", True), ("tensor", False))):  # fmt: skip
      raise _unsupported(where, f"activations {json.dumps(inputs)[:200]} (int8 symmetric, per "
                         "token or static per tensor, are read)")  # fmt: skip
    act = "dynamic" if mode[1] else "static"
  return Scheme(bits, symmetric, strategy, size if strategy == "group" else None, act), fmt


def _config(qc: Any) -> tuple[list[tuple[list[str], Scheme, str]], list[str]]:
  where = "quantization_config"
  if _field(qc, "quant_method", (str,), where) != "compressed-tensors":
    raise _unsupported(f"{where}.quant_method", repr(qc.get("quant_method")))
  for key in ("kv_cache_scheme", "transform_config"):
    if qc.get(key):
      raise _unsupported(f"{where}.{key}", "set (it changes what the model computes)")
  sparsity = _field(qc, "sparsity_config", (dict, type(None)), where) or {}
  if sparsity.get("format", "dense") != "dense":
    raise _unsupported(f"{where}.sparsity_config", f"format {sparsity.get('format')!r}")
  ignore, fmt = _field(qc, "ignore", (list, type(None)), where) or [], qc.get("format")
  groups = []
  for key, group in _field(qc, "config_groups", (dict,), where).items():
    at = f"{where}.config_groups.{key}"
    targets = _field(group, "targets", (list,), at)
    if not all(isinstance(t, str) for t in [*targets, *ignore]):
      raise _bad(at, "has `targets` or `ignore` entries that are not strings")
    groups.append((targets, *_read_scheme(group, at, fmt)))
  return groups, ignore


def _matches(module: str, targets: list[str], classes: bool = True) -> bool:
  """Whether `module` is named by `targets`: exact names, `re:` regexes, and (with `classes`)
  class names such as `Linear`, which name every module holding quantized tensors."""
  for target in targets:
    if target.startswith("re:"):
      try:
        if re.match(target[3:], module):
          return True
      except re.error as e:
        raise _bad(f"target {target!r}", f"is not a regular expression ({e})") from None
    elif target == module or (classes and "." not in target and target[:1].isupper()):
      return True
  return False


def _tensor(tensors: dict, name: str, kinds: str, want: tuple | None = None) -> np.ndarray:
  """`tensors[name]`, checked: dtype kind (`f` takes bf16), shape `want`, finite floats."""
  if name not in tensors:
    raise _bad(f"tensor `{name}`", "is missing")
  array = np.asarray(tensors[name])
  kind = "f" if array.dtype.name == "bfloat16" else array.dtype.kind
  if kind not in kinds or (want is not None and array.size != math.prod(want)):
    raise _bad(f"tensor `{name}`", f"is {array.dtype} {array.shape}; expected {kinds} {want}")
  if want is not None and array.ndim == 2 and array.shape != want:
    raise _bad(f"tensor `{name}`", f"has shape {array.shape}; expected {want}")
  if kind == "f" and not np.all(np.isfinite(array.astype(np.float32))):
    raise _bad(f"tensor `{name}`", "holds NaN or Inf")
  return array if want is None else array.reshape(want)


def _ints(array: np.ndarray, bits: int, name: str) -> np.ndarray:
  lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
  if array.size and (int(array.min()) < lo or int(array.max()) > hi):
    raise _bad(f"tensor `{name}`", f"holds values outside the int{bits} range [{lo}, {hi}]")
  return array.astype(np.int8)


def _packed(tensors: dict, name: str, bits: int, want: tuple, length: int, axis: int):
  array = _tensor(tensors, name, "i")
  if array.dtype != np.int32 or array.shape != want:
    raise _bad(f"tensor `{name}`", f"is {array.dtype} {array.shape}; expected int32 {want}")
  return unpack_int32(array, bits, length, axis)


def read_module(tensors: dict, module: str, s: Scheme, fmt: str) -> tuple[QArray, set[str]]:
  """One quantized Linear module as a `QArray` in our `(K, N)` layout, and the names it used."""
  p = f"{module}."
  if fmt == PACKED:
    shape = _tensor(tensors, p + "weight_shape", "iu", (2,))
    n, k = (int(d) for d in shape)
    if min(n, k) < 1:
      raise _bad(f"tensor `{p}weight_shape`", f"is {shape.tolist()}; expected [out, in] > 0")
    codes = _packed(tensors, p + "weight_packed", s.bits, (n, packed_length(k, s.bits)), k, 1)
  else:
    codes = _tensor(tensors, p + "weight", "i")
    if codes.ndim != 2:
      raise _bad(f"tensor `{p}weight`", f"has shape {codes.shape}; expected (out, in)")
    (n, k), codes = codes.shape, _ints(codes, s.bits, p + "weight")
  groups = math.ceil(k / s.group_size) if s.strategy == "group" else 1
  want = (1, 1) if s.strategy == "tensor" else (n, groups)
  scale = _tensor(tensors, p + "weight_scale", "f", want).T.astype(np.float32)
  zp, name = None, p + "weight_zero_point"
  if not s.symmetric:
    if fmt == PACKED and s.strategy != "tensor":  # packed along the output axis
      zp = _packed(tensors, name, s.bits, (packed_length(n, s.bits), groups), n, 0).T
    else:
      zp = _ints(_tensor(tensors, name, "iu", want), s.bits, name).T
  elif name in tensors and np.any(tensors[name]):
    raise _bad(f"tensor `{name}`", "is nonzero for a symmetric scheme")
  symmetric = s.symmetric
  if symmetric and s.bits < 8 and codes.size and int(codes.min()) == -(1 << (s.bits - 1)):
    # compressed-tensors' symmetric codes reach -2^(b-1); our symmetric range stops at
    # -(2^(b-1) - 1), so such a kernel is kept exactly as asymmetric with zero points of 0.
    symmetric, zp = False, np.zeros(scale.shape, np.int8)
  grouped = s.strategy == "group" and s.group_size <= k
  bf16 = scale.astype(jnp.bfloat16)
  if grouped and s.bits <= 4 and np.array_equal(bf16.astype(np.float32), scale):
    scale = bf16  # `QuantSpec.scale_dtype`'s choice, when it holds the values exactly
  codes_kn = jnp.asarray(codes.T.astype(np.int32))
  qmin = -(1 << (s.bits - 1)) + int(symmetric)
  stored = codes_kn.astype(jnp.int8) if s.bits == 8 else packing.pack_codes(
    codes_kn, bits=s.bits, qmin=qmin)  # fmt: skip
  act_scale = None
  if s.act == "static":
    act_scale = jnp.asarray(_tensor(tensors, p + "input_scale", "f", (1,)), jnp.float32)
  q = QArray(
    codes=stored, scale=jnp.asarray(scale), zero_point=None if zp is None else jnp.asarray(zp),
    input_scale=None, bits=s.bits, symmetric=symmetric, format="int", dtype="float32",
    group_size=s.group_size if grouped else None, per_tensor=s.strategy == "tensor",
    shape=(k, n), contract_dims=(0,), k=k, n=n, note=f"compressed-tensors {s.describe()}",
    act_bits=8 if s.act else None, act_scale=act_scale,
  )  # fmt: skip
  used = {p + x for x in _SUFFIXES if p + x in tensors}
  return q, used if fmt == PACKED else used | {p + "weight"}


def read_compressed_state(tensors: dict[str, np.ndarray], quantization_config: dict) -> dict:
  """The inverse of `compressed_state`: `{HF tensor name: float array or QArray}`.

  Quantized modules come back as `QArray`s named `<module>.weight`, in our `(K, N)` layout
  (already transposed back), with the codes, scales and zero points stored. Every other tensor
  is returned as stored (HF layout and dtype: the caller transposes float Linear weights).

  Raises:
    CheckpointError: a config or tensor that does not fit (unknown format or scheme, a missing
      tensor, a wrong shape or dtype, codes out of range, a quantized module no group targets).
  """
  groups, ignore = _config(quantization_config)
  modules = sorted({n.rsplit(".", 1)[0] for n in tensors if n.rsplit(".", 1)[-1] in _SUFFIXES})
  out, used = {}, set()
  for module in modules:
    match = next((g for g in groups if _matches(module, g[0])), None)
    if match is None or _matches(module, ignore, classes=False):
      raise _bad(f"module `{module}`", "holds quantized tensors but no config group targets it")
    out[f"{module}.weight"], names = read_module(tensors, module, match[1], match[2])
    used |= names
    extra = [n for n in tensors if n.startswith(f"{module}.") and n not in used
             and n != f"{module}.bias"]  # fmt: skip
    if extra:
      raise _unsupported(f"module `{module}`", f"stored with extra tensors {extra[:3]}")
  for targets, _, _ in groups:
    missing = [t for t in targets if "." in t and not t.startswith("re:") and t not in modules]
    if missing:
      raise _bad(f"targets {missing[:3]}", "name modules with no quantized tensors (missing)")
  out.update({name: array for name, array in tensors.items() if name not in used})
  return out
