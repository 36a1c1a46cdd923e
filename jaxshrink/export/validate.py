"""Checks of an untrusted manifest, before anything it describes is read or decoded.

`read_manifest` runs `check_manifest` on the parsed JSON: every field has its type, every
number its bounds, and every leaf's stored arrays are exactly the ones its encoding implies
from the recorded metadata (names, dtypes and shapes: codes `(K, N)` or packed rows for the
recorded bits, `ceil(K / group_size)` scale rows, `C(m, n)` pattern ranks, `(K, r)` and
`(r, N)` factors, ...). So a bound that encoding enforces is enforced on decode too: bits
outside the supported set, `m` beyond the pattern tables, group sizes larger than `K`,
negative or huge shapes, shapes whose product disagrees with the arrays, dtypes outside
the allow-lists, unknown encodings or stored forms, and nesting deeper than `MAX_DEPTH` are
each a `CheckpointError` naming the leaf and the field. Encodings registered outside
jaxshrink get the generic checks (known field names, allowed dtypes, bounded shapes).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from jaxshrink import encoding
from jaxshrink.errors import CheckpointError

MAX_RANK = 8
MAX_ELEMENTS = 1 << 40  # per logical or stored array
MAX_DEPTH = 3  # encodings nested in encodings (2:4 + int4 is depth 2)
MAX_TEXT = 4096  # characters of any string field
FLOATS = ("float32", "float16", "bfloat16", "float64")
INTS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
FP8 = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
LOGICAL_DTYPES = (*FLOATS, *INTS, "bool")
STORED_DTYPES = (*LOGICAL_DTYPES, *FP8.values())
_HEX = re.compile(r"[0-9a-f]{16}")
_TOP = {"format": str, "format_version": int, "jaxshrink_version": str, "created": str,
        "model": (str, type(None)), "data": (str, type(None)), "recipe": (dict, type(None)),
        "metrics": dict, "pack_below": int, "leaves": list}  # fmt: skip
_LEAF_KEYS = {"path", "keys", "encoding", "shape", "dtype", "static", "children", "stored_as",
              "sparsity", "sha256", "arrays"}  # fmt: skip
_META_KEYS = {"encoding", "shape", "dtype", "static", "children", "stored_as"}


def _fail(where: str, field: str, expected: str, got: Any) -> CheckpointError:
  shown = repr(got)
  shown = shown if len(shown) <= 80 else shown[:77] + "..."
  return CheckpointError(
    f"{where}: `{field}` must be {expected}; got {shown}. The manifest is damaged or was not "
    "written by jaxshrink: re-export the checkpoint."
  )


def _int(value: Any, where: str, field: str, lo: int = 0, hi: int = MAX_ELEMENTS) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
    raise _fail(where, field, f"an integer in [{lo}, {hi}]", value)
  return value


def _text(value: Any, where: str, field: str) -> str:
  if not isinstance(value, str) or len(value) > MAX_TEXT:
    raise _fail(where, field, f"a string of at most {MAX_TEXT} characters", value)
  return value


def _shape(value: Any, where: str, field: str) -> tuple[int, ...]:
  if not isinstance(value, list) or len(value) > MAX_RANK:
    raise _fail(where, field, f"a list of at most {MAX_RANK} sizes", value)
  shape = tuple(_int(d, where, field) for d in value)
  if math.prod(shape) > MAX_ELEMENTS:
    raise _fail(where, field, f"a shape of at most {MAX_ELEMENTS} elements", value)
  return shape


def _dtype(value: Any, where: str, field: str, allowed) -> str:
  if value not in allowed:
    raise _fail(where, field, f"one of {', '.join(allowed)}", value)
  return value


def _static_value(value: Any, where: str, field: str, depth: int = 0) -> None:
  if isinstance(value, list) and depth < 2 and len(value) <= 64:
    for v in value:
      _static_value(v, where, field, depth + 1)
  elif value is None or isinstance(value, (bool, int, float)):
    pass
  elif not isinstance(value, str) or len(value) > MAX_TEXT:
    raise _fail(where, field, "a number, bool, short string or short list of them", value)


@dataclasses.dataclass
class _Meta:
  """One (possibly nested) encoding description, type-checked."""

  name: str
  shape: tuple[int, ...]
  dtype: str
  static: dict[str, Any]
  children: dict[str, _Meta]
  stored_as: dict[str, str]


def _meta(raw: Any, where: str, prefix: str, depth: int) -> _Meta:
  if not isinstance(raw, dict) or set(raw) - _META_KEYS:
    raise _fail(where, prefix or "children", f"an object with keys from {sorted(_META_KEYS)}", raw)
  name = raw.get("encoding")
  if name not in encoding.registered_encodings():
    raise _fail(where, f"{prefix}encoding", f"a known encoding {encoding.registered_encodings()}",
                name)  # fmt: skip
  cls = encoding.encoding_class(name)
  shape = _shape(raw.get("shape"), where, f"{prefix}shape")
  dtype = _dtype(raw.get("dtype"), where, f"{prefix}dtype", LOGICAL_DTYPES)
  static = raw.get("static", {})
  statics = {f.name for f in dataclasses.fields(cls)} - set(cls.array_fields) - {"shape", "dtype"}
  if not isinstance(static, dict) or set(static) - statics:
    raise _fail(where, f"{prefix}static", f"an object with keys from {sorted(statics)}", static)
  for key, value in static.items():
    _static_value(value, where, f"{prefix}static.{key}")
  children = raw.get("children", {})
  if (
    not isinstance(children, dict)
    or set(children) - set(cls.array_fields)
    or not children
    and ("children" in raw)
  ):
    raise _fail(where, f"{prefix}children", f"a non-empty object with keys from "
                f"{list(cls.array_fields)}", children)  # fmt: skip
  if children and depth >= MAX_DEPTH:
    raise _fail(where, f"{prefix}children", f"nested at most {MAX_DEPTH} deep", "deeper")
  stored_as = raw.get("stored_as", {})
  if "stored_as" in raw and (name != "nm" or stored_as != {"indices": "nm-ranks"}):
    raise _fail(where, f"{prefix}stored_as", "absent, or {'indices': 'nm-ranks'} for nm",
                stored_as)  # fmt: skip
  nested = {
    field: _meta(child, where, f"{prefix}children.{field}.", depth + 1)
    for field, child in children.items()
  }
  return _Meta(name, shape, dtype, static, nested, stored_as)


# ---- what each encoding stores, from its description -------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
  dtypes: tuple[str, ...]
  shape: tuple[int, ...] | None  # None: any (bounded) shape
  optional: bool = False


Stored = dict[str, tuple[str, tuple[int, ...]]]  # the manifest's `arrays`: name -> (dtype, shape)


def _sub(stored: Stored, field: str) -> Stored:
  prefix = field + "."
  return {k[len(prefix) :]: v for k, v in stored.items() if k.startswith(prefix)}


class _Expect:
  """Collects the arrays one encoding level implies, nested encodings included."""

  def __init__(self, meta: _Meta, stored: Stored, where: str, prefix: str):
    self.meta, self.stored, self.where, self.prefix = meta, stored, where, prefix
    self.out: dict[str, _Spec] = {}

  def fail(self, field: str, expected: str, got: Any) -> CheckpointError:
    return _fail(self.where, self.prefix + field, expected, got)

  def static(self, key: str, lo: int, hi: int) -> int:
    return _int(self.meta.static.get(key), self.where, f"{self.prefix}static.{key}", lo, hi)

  def part(self, field: str, dtypes, shape, optional: bool = False) -> None:
    """Field `field`: one array, or a nested encoding of logical shape `shape`."""
    if field in self.meta.children:
      child = self.meta.children[field]
      if shape is not None and child.shape != tuple(shape):
        raise self.fail(f"children.{field}.shape", f"{list(shape)}", list(child.shape))
      sub = _expected(
        child, _sub(self.stored, field), self.where, f"{self.prefix}children.{field}."
      )
      self.out.update({f"{field}.{name}": spec for name, spec in sub.items()})
    else:
      self.out[field] = _Spec(tuple(dtypes), None if shape is None else tuple(shape), optional)

  def contract(self, shape: tuple[int, ...] | None = None) -> tuple[int, int]:
    """`(K, N)`, the matrix view of `shape` (default: the logical shape)."""
    shape = self.meta.shape if shape is None else shape
    dims, rank = self.meta.static.get("contract_dims"), len(shape)
    if (
      not isinstance(dims, list)
      or not dims
      or any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < rank for d in dims)
      or len(set(dims)) != len(dims)
    ):
      raise self.fail("static.contract_dims", f"distinct axes of a rank-{rank} array", dims)
    k = math.prod(shape[d] for d in dims)
    return k, math.prod(shape) // max(k, 1)

  def layers(self) -> tuple[int, ...]:
    """`(L,)` for a kernel stacked on a leading layer axis (`static.layers`), else `()`."""
    if self.meta.static.get("layers") is None:
      return ()
    if not self.meta.shape:
      raise self.fail("static.layers", "null for a rank-0 array", self.meta.static["layers"])
    layers = self.static("layers", 1, self.meta.shape[0])
    if layers != self.meta.shape[0]:
      raise self.fail("static.layers", f"shape[0] = {self.meta.shape[0]}", layers)
    return (layers,)


def _qarray(e: _Expect) -> None:
  from jaxshrink.quant.packing import packed_rows
  from jaxshrink.quant.spec import FORMATS, INT_BITS

  s = e.meta.static
  fmt = s.get("format")
  if fmt not in FORMATS:
    raise e.fail("static.format", f"one of {list(FORMATS)}", fmt)
  bits = e.static("bits", 2, 8)
  if (fmt == "int" and bits not in INT_BITS) or (fmt != "int" and bits != 8):
    raise e.fail("static.bits", f"one of {list(INT_BITS)} (8 for fp8)", bits)
  for flag in ("symmetric", "per_tensor"):
    if not isinstance(s.get(flag), bool):
      raise e.fail(f"static.{flag}", "true or false", s.get(flag))
  if not isinstance(s.get("note", ""), str):
    raise e.fail("static.note", "a string", s.get("note"))
  if s.get("act_bits") is not None and s.get("act_bits") not in INT_BITS:
    raise e.fail("static.act_bits", f"null or one of {list(INT_BITS)}", s.get("act_bits"))
  lead = e.layers()  # a stacked kernel: every array has a leading layer axis
  layer_shape = e.meta.shape[len(lead) :]
  k, n = e.contract(layer_shape)
  if (s.get("k"), s.get("n")) != (k, n):
    raise e.fail("static.k/n", f"({k}, {n}), the matrix view of {list(layer_shape)}",
                 (s.get("k"), s.get("n")))  # fmt: skip
  group = s.get("group_size")
  if s.get("table", False) is not False:
    if lead:
      raise e.fail("static.layers", "null for an embedding table", s.get("layers"))
    _table(e, s, k)
  if s["per_tensor"] or group is None:
    if group is not None:
      raise e.fail("static.group_size", "null for per-tensor codes", group)
    scale = (1, 1) if s["per_tensor"] else (1, n)
  else:
    scale = (math.ceil(k / e.static("group_size", 1, max(k, 1))), n)
  if fmt != "int":
    e.part("codes", [FP8[fmt]], (*lead, k, n))
  elif bits == 8:
    e.part("codes", ["int8"], (*lead, k, n))
  else:
    e.part("codes", ["uint8"], (*lead, packed_rows(k, bits), n))
  e.part("scale", ["float32", "bfloat16"], (*lead, *scale))
  if not s["symmetric"]:
    e.part("zero_point", ["int8"], (*lead, *scale))
  e.part("input_scale", ["float32"], (*lead, k), optional=True)
  e.part("act_scale", ["float32"], (*lead, 1), optional=True)


def _table(e: _Expect, s: dict[str, Any], k: int) -> None:
  """An embedding table: `(vocab, dim)` rows, one scale per row or per group dividing `dim`."""
  if s["table"] is not True:
    raise e.fail("static.table", "true or false", s["table"])
  if len(e.meta.shape) != 2 or s.get("contract_dims") != [1]:
    raise e.fail("static.contract_dims", "[1] on a rank-2 (vocab, dim) table",
                 [list(e.meta.shape), s.get("contract_dims")])  # fmt: skip
  group = s.get("group_size")
  if s["per_tensor"] or group is not None and (not isinstance(group, int) or k % max(group, 1)):
    raise e.fail("static.group_size", f"null (one scale per row) or a divisor of dim={k}",
                 "per-tensor" if s["per_tensor"] else group)  # fmt: skip


def _nm(e: _Expect) -> None:
  from jaxshrink.export import nm_ranks
  from jaxshrink.sparsity.encodings import index_bits

  shape = e.meta.shape
  m = e.static("m", 2, 256)
  n = e.static("n", 1, m - 1)
  axis = e.static("axis", 0, len(shape) - 1)
  if shape[axis] % m:
    raise e.fail("static.m", f"a divisor of shape[{axis}] of {list(shape)}", m)
  groups, cols = shape[axis] // m, math.prod(shape) // max(shape[axis], 1)
  e.part("values", [e.meta.dtype], (groups * n, cols))
  if e.meta.stored_as:
    if m > nm_ranks.MAX_M:
      raise e.fail("static.m", f"at most {nm_ranks.MAX_M} for stored pattern ranks", m)
    e.part("indices", ["uint8"], (nm_ranks.stored_size(n=n, m=m, count=groups * cols),))
  else:
    e.part("indices", ["uint8"], (math.ceil(groups * n * cols / (8 // index_bits(m))),))


def _bitmask(e: _Expect) -> None:
  size = math.prod(e.meta.shape)
  nnz = e.static("nnz", 0, size)
  e.part("bits", ["uint8"], (math.ceil(size / 8),))
  e.part("values", [e.meta.dtype], (nnz,))


def _lowrank(e: _Expect) -> None:
  k, n = e.contract()
  a = e.meta.children.get("a")
  stored_a = e.stored.get("a", (None, ()))[1]
  rank = a.shape[-1] if a is not None and a.shape else (stored_a[-1] if stored_a else 0)
  if not 1 <= rank <= max(min(k, n), 1):
    raise e.fail("a", f"a (K, r) factor with 1 <= r <= {min(k, n)}", rank)
  e.part("a", FLOATS, (k, rank))
  e.part("b", FLOATS, (rank, n))


def _cast(e: _Expect) -> None:
  e.part("values", ["bfloat16", "float16"], e.meta.shape)


_EXPECTED = {"qarray": _qarray, "nm": _nm, "bitmask": _bitmask, "lowrank": _lowrank, "cast": _cast}


def _expected(meta: _Meta, stored: Stored, where: str, prefix: str = "") -> dict[str, _Spec]:
  e = _Expect(meta, stored, where, prefix)
  check = _EXPECTED.get(meta.name)
  if check is not None:
    check(e)
  else:  # registered outside jaxshrink: any allowed dtype and bounded shape per array field
    for field in encoding.encoding_class(meta.name).array_fields:
      e.part(field, STORED_DTYPES, None, optional=True)
  return e.out


def _stored(raw: Any, where: str) -> Stored:
  if not isinstance(raw, dict) or not raw or len(raw) > 64:
    raise _fail(where, "arrays", "an object of up to 64 `name: [dtype, shape]` entries", raw)
  out = {}
  for name, spec in raw.items():
    if not isinstance(spec, list) or len(spec) != 2:
      raise _fail(where, f"arrays.{name}", "[dtype, shape]", spec)
    out[name] = (_dtype(spec[0], where, f"arrays.{name}", STORED_DTYPES),
                 _shape(spec[1], where, f"arrays.{name}"))  # fmt: skip
  return out


def check_leaf(leaf: Any, index: int) -> None:
  """Type- and bounds-checks one manifest leaf as written; raises `CheckpointError`."""
  where = f"leaf {index}"
  if not isinstance(leaf, dict):
    raise _fail(where, "leaves", "objects", leaf)
  path = _text(leaf.get("path"), where, "path")
  where = f"leaf `{path}`"
  if not path or set(leaf) - _LEAF_KEYS:
    raise _fail(where, "keys of the leaf", f"from {sorted(_LEAF_KEYS)}", sorted(leaf))
  keys = leaf.get("keys", path.split("/"))
  if (
    not isinstance(keys, list)
    or not keys
    or len(keys) > 64
    or any(
      isinstance(k, bool) or not isinstance(k, (str, int)) or isinstance(k, str) and len(k) > 256
      for k in keys
    )
  ):
    raise _fail(where, "keys", "a list of strings and integers", keys)
  sparsity = leaf.get("sparsity", 0)
  if (
    isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (0 <= sparsity <= 1)
  ):
    raise _fail(where, "sparsity", "a number in [0, 1]", sparsity)
  if not isinstance(leaf.get("sha256"), str) or not _HEX.fullmatch(leaf["sha256"]):
    raise _fail(where, "sha256", "16 hex digits", leaf.get("sha256"))
  if "encoding" not in leaf:  # a plain array: its one array is the logical shape and dtype
    if set(leaf) & {"static", "children", "stored_as", "arrays"}:
      raise _fail(where, "encoding", "present when encoding fields are", None)
    shape = _shape(leaf.get("shape"), where, "shape")
    stored = {"value": (_dtype(leaf.get("dtype"), where, "dtype", LOGICAL_DTYPES), shape)}
  else:
    meta = _meta({k: leaf[k] for k in _META_KEYS if k in leaf}, where, "", 1)
    stored = _stored(leaf.get("arrays"), where)
    expected = _expected(meta, stored, where)
    for name, spec in expected.items():
      if name not in stored:
        if not spec.optional:
          raise _fail(where, f"arrays.{name}", "present", None)
        continue
      dtype, shape = stored[name]
      if dtype not in spec.dtypes or (spec.shape is not None and shape != spec.shape):
        want = f"{'/'.join(spec.dtypes)} {list(spec.shape) if spec.shape else ''}".strip()
        raise _fail(where, f"arrays.{name}", want, [dtype, list(shape)])
    extra = sorted(set(stored) - set(expected))
    if extra:
      raise _fail(where, "arrays", f"only {sorted(expected)}", extra)


def check_manifest(manifest: dict[str, Any], where: str) -> None:
  """Type-checks every top-level field and every leaf; raises `CheckpointError`."""
  for key, kind in _TOP.items():
    if (
      key not in manifest
      or not isinstance(manifest[key], kind)
      or (kind is int and isinstance(manifest[key], bool))
    ):
      raise _fail(where, key, f"present, of type {getattr(kind, '__name__', kind)}",
                  manifest.get(key))  # fmt: skip
  extra = sorted(set(manifest) - set(_TOP))
  if extra:
    raise _fail(where, "top-level keys", f"from {sorted(_TOP)}", extra)
  for key in ("jaxshrink_version", "created", "model", "data"):
    if manifest[key] is not None:
      _text(manifest[key], where, key)
  _int(manifest["pack_below"], where, "pack_below")
  seen = set()
  for index, leaf in enumerate(manifest["leaves"]):
    check_leaf(leaf, index)
    if leaf["path"] in seen:
      raise _fail(f"leaf `{leaf['path']}`", "path", "unique", leaf["path"])
    seen.add(leaf["path"])
