"""What one kernel can become in a search, and the recipe stages that make it so.

A candidate is named by a short string:

| name           | the kernel is                                                       |
|----------------|---------------------------------------------------------------------|
| `float`        | left as it is                                                       |
| `bf16`, `fp16` | stored as bfloat16 / float16 (`cast`)                               |
| `int8`         | int8, one symmetric scale per output channel (`quantize`)           |
| `int4-g128`    | int4 (any of 2..8 bits), asymmetric, one scale per 128 inputs       |
| `int4`         | int4 (2..7 bits), asymmetric, one scale per output channel          |
| `2:4`          | 2 of every 4 weights zero (`prune`, structure 2:4)                  |
| `2:4+int4`     | 2:4 with its kept weights int4 (`prune`, `quantize_nonzeros: 4`)    |
| `lowrank-0.5`  | two factors holding that fraction of the kernel's params (`factorize`) |

`methods` picks how each family is made: `int8`/`int4`/... (any bit width) take a `quantize`
method (`rtn`, `gptq`, `awq`), `2:4` a `prune` method (`oneshot`, `wanda`, `sparsegpt`),
`lowrank` a `factorize` method (`whitened`, `svd`). An assignment of candidates to kernels
becomes plain stages, one override (or one target) per kernel, in a fixed order: factorize,
prune, quantize (one stage per method), cast.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from jaxshrink.errors import UsageError

CASTS = {"bf16": "bfloat16", "fp16": "float16"}
DEFAULT_METHODS = {"int8": "rtn", "int": "gptq", "2:4": "sparsegpt", "lowrank": "whitened"}
FAMILY_METHODS = {
  "int": ("rtn", "gptq", "awq"),
  "2:4": ("oneshot", "wanda", "sparsegpt"),
  "lowrank": ("whitened", "svd"),
}
_INT = re.compile(r"int([2-8])(?:-g([1-9][0-9]*))?")
_NM = re.compile(r"2:4(?:\+int([2-8]))?")
_LOWRANK = re.compile(r"lowrank-(0?\.[0-9]+)")
GRAMMAR = "float, bf16, fp16, int<2-8>[-g<group>], 2:4, 2:4+int<2-8>, lowrank-<fraction>"


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One way to store a kernel (see the module docstring for the names)."""

  name: str
  cast: str | None = None
  bits: int | None = None
  group_size: int | None = None
  nm: bool = False
  budget: float | None = None

  def fits_table(self, row: int) -> bool:
    """Whether a gathered table (read by row lookups) with rows of `row` values can be stored
    this way: float, a cast, int per row, or int per group of a row when the group divides
    it; not sparse or factorized."""
    if self.nm or self.budget is not None:
      return False
    return self.group_size is None or row % self.group_size == 0

  @property
  def family(self) -> str:
    """The key of `methods` that picks how it is made: `int8`, `int4`, `2:4`, `lowrank`, or ""
    for float and casts."""
    if self.nm:
      return "2:4"
    if self.budget is not None:
      return "lowrank"
    return f"int{self.bits}" if self.bits else ""


def parse_candidate(name: Any) -> Candidate:
  """The candidate a name stands for.

  Raises:
    UsageError: a name outside the grammar (`GRAMMAR`).
  """
  text = str(name).strip()
  if text == "float":
    return Candidate(text)
  if text in CASTS:
    return Candidate(text, cast=CASTS[text])
  if m := _INT.fullmatch(text):
    bits, group = int(m.group(1)), int(m.group(2)) if m.group(2) else None
    if bits == 8 and group is not None:
      raise UsageError(f"Candidate {text!r}: int8 is per output channel; use `int8`.")
    return Candidate(text, bits=bits, group_size=group)
  if m := _NM.fullmatch(text):
    return Candidate(text, nm=True, bits=int(m.group(1)) if m.group(1) else None)
  if m := _LOWRANK.fullmatch(text):
    budget = float(m.group(1))
    if not 0 < budget < 1:
      raise UsageError(f"Candidate {text!r}: the kept fraction must be in (0, 1).")
    return Candidate(text, budget=budget)
  raise UsageError(f"Unknown search candidate {text!r}; candidates are {GRAMMAR}.")


def parse_methods(methods: Any, candidates: list[Candidate]) -> dict[str, str]:
  """`{family: method}` for every family among `candidates`, defaults filled in.

  Keys are families (`int4`, `int8`, `2:4`, `lowrank`) or `int` (every bit width).
  """
  if methods is None:
    methods = {}
  if not isinstance(methods, Mapping):
    raise UsageError(
      f"`methods` of `search` must be a mapping like {{int4: gptq}}; got {methods!r}."
    )
  families = {c.family for c in candidates if c.family}
  out = {}
  for family in sorted(families):
    kind = "int" if family.startswith("int") else family
    default = DEFAULT_METHODS.get(family, DEFAULT_METHODS[kind])
    method = methods.get(family, methods.get(kind, default))
    if method not in FAMILY_METHODS[kind]:
      raise UsageError(
        f"`methods.{family}` of `search` must be one of {list(FAMILY_METHODS[kind])}; got "
        f"{method!r}."
      )
    out[family] = method
  valid = families | {"int"} if any(f.startswith("int") for f in families) else families
  for key in methods:
    if key not in valid:
      raise UsageError(
        f"`methods.{key}` of `search` names no candidate family; the candidates' families are "
        f"{sorted(valid)}."
      )
  return out


def _union(paths: list[str]) -> str:
  return "(" + "|".join(re.escape(p) for p in sorted(paths)) + ")"


def assignment_stages(
  assignment: Mapping[str, Candidate],
  methods: Mapping[str, str],
  *,
  tables: Mapping[str, Candidate] | None = None,
  embeddings: Any = None,
  calibration_batches: int = 8,
) -> list[tuple[str, dict[str, Any]]]:
  """The plain recipe stages that store each kernel (and each gathered table in `tables`) as
  its candidate.

  Only keys away from a stage's defaults are given, so the list reads as a recipe. Tables are
  quantized by the first quantize stage's `embeddings`, one override per table (`skip: true`
  keeps one float); a fixed `embeddings` spec is used instead when `tables` is empty.

  Raises:
    UsageError: an int table (or a fixed `embeddings`) without any int kernel to quantize it
      with.
  """
  tables = dict(tables or {})
  everything = {**assignment, **tables}
  by: dict[str, list[str]] = {}
  for path, candidate in assignment.items():
    by.setdefault(candidate.name, []).append(path)
  candidates = {c.name: c for c in everything.values()}
  stages: list[tuple[str, dict[str, Any]]] = []
  for name, paths in sorted(by.items()):
    c = candidates[name]
    if c.budget is not None:
      method = methods["lowrank"]
      options = {"target": _union(paths), "budget": c.budget, "method": method}
      if method == "whitened":
        options["calibration_batches"] = calibration_batches
      stages.append(("factorize", options))
  for name, paths in sorted(by.items()):
    c = candidates[name]
    if c.nm:
      method = methods["2:4"]
      options = {"target": _union(paths), "structure": "2:4", "method": method}
      if c.bits:
        options["quantize_nonzeros"] = c.bits
      stages.append(("prune", options))
  if any(c.bits for c in tables.values()):
    embeddings = {
      "bits": 8,
      "overrides": [_table_override(p, c) for p, c in sorted(tables.items())],
    }
  quantized: dict[str, dict[str, dict[str, Any]]] = {}
  for path, c in sorted(assignment.items()):
    if c.bits and not c.nm:
      override = {"target": re.escape(path), "weight_bits": c.bits}
      if c.bits < 8:
        override.update(group_size=c.group_size, symmetric=False)
      quantized.setdefault(methods[c.family], {})[path] = override
  if embeddings is not None and not quantized:
    raise UsageError(
      "Gathered tables are quantized with the kernels (`embeddings` of `quantize`), and this "
      "assignment quantizes no kernel."
    )
  for method, overrides in sorted(quantized.items()):
    options: dict[str, Any] = {"target": _union(list(overrides)), "method": method}
    if method != "rtn":
      options["calibration_batches"] = calibration_batches
    options["overrides"] = list(overrides.values())
    if embeddings is not None and not any(k == "quantize" for k, _ in stages):
      options["embeddings"] = embeddings
    stages.append(("quantize", options))
  cast: dict[str, list[str]] = {}
  for path, c in sorted(everything.items()):
    if c.cast:
      cast.setdefault(c.cast, []).append(path)
  for dtype, paths in sorted(cast.items()):
    stages.append(("cast", {"target": _union(paths), "dtype": dtype}))
  return stages


def _table_override(path: str, c: Candidate) -> dict[str, Any]:
  if not c.bits:
    return {"target": re.escape(path), "skip": True}
  return {"target": re.escape(path), "bits": c.bits, "group_size": c.group_size}
