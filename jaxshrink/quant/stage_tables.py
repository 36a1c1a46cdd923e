"""The `embeddings` option of the `quantize` stage: which gathered tables, with which spec.

`embeddings: {bits: 8}` quantizes every table the model reads by gather (word, position and
token-type embeddings), one scale per row or per `group_size` elements of a row;
`embeddings.overrides` sets other specs for some tables, first match wins; an override with
`skip: true` keeps its tables float.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxshrink.errors import UsageError
from jaxshrink.quant.ptq import gather_tables, quantize_tables
from jaxshrink.quant.spec import QuantSpec
from jaxshrink.tree import Rule

EMBEDDING_KEYS = {"bits": 8, "group_size": None, "symmetric": True, "overrides": []}


def first_batch(pipeline: Any) -> np.ndarray:
  """One training batch of the model's batch size: enough to trace which leaves are gathered."""
  return np.asarray(pipeline.dataset.x_train)[: pipeline.model.batch_size]


def with_tables(tree: Any, specs: dict[str, QuantSpec]) -> Any:
  try:
    for spec in dict.fromkeys(specs.values()):  # one pass per distinct spec, in order
      tree = quantize_tables(tree, [p for p, s in specs.items() if s == spec], spec)
  except ValueError as err:  # e.g. a group size that does not divide a table's rows
    raise UsageError(f"`embeddings` of `quantize`: {err}") from None
  return tree


def _table_spec(entry: dict[str, Any], where: str) -> QuantSpec:
  spec = QuantSpec(bits=entry["bits"], symmetric=entry["symmetric"], group_size=entry["group_size"])
  try:
    spec.validate(where)
  except (TypeError, ValueError) as err:
    raise UsageError(f"`{where}` of `quantize`: {err}") from None
  return spec


def table_specs(options: dict[str, Any], paths: list[str]) -> dict[str, QuantSpec]:
  """`{path: QuantSpec}` of the gathered tables `paths` under `embeddings` and its overrides.

  Raises:
    UsageError: `embeddings` or an override is not a mapping of known keys, a spec is
      invalid, or an override's `target` matches no table.
  """
  emb = options["embeddings"]
  keys = sorted(EMBEDDING_KEYS)
  if not isinstance(emb, dict) or set(emb) - set(EMBEDDING_KEYS):
    raise UsageError(
      f"`embeddings` of `quantize` must be null or a mapping with keys from {keys}; got "
      f"{emb!r}. E.g. `embeddings: {{bits: 8}}` (int8 per row) or `{{bits: 4, group_size: 32}}`."
    )
  base = {**EMBEDDING_KEYS, **emb}
  specs = dict.fromkeys(paths, _table_spec(base, "embeddings"))
  if not isinstance(base["overrides"], list):
    raise UsageError(f"`embeddings.overrides` of `quantize` must be a list; got {emb!r}.")
  taken: set[str] = set()  # first match wins: a table keeps the first override's spec
  for i, entry in enumerate(base["overrides"]):
    where = f"embeddings.overrides[{i}]"
    valid = {"target", "bits", "group_size", "symmetric", "skip"}
    if not isinstance(entry, dict) or "target" not in entry or set(entry) - valid:
      raise UsageError(
        f"`{where}` of `quantize` must be a mapping with a `target` regex and keys from "
        f"{sorted(valid)}; got {entry!r}."
      )
    hits = [p for p in paths if Rule(include=entry["target"], min_ndim=0).matches(p, None)]
    if not hits:
      raise UsageError(
        f"`{where}.target` {entry['target']!r} of `quantize` matches no embedding table; the "
        f"tables are {', '.join(paths)}."
      )
    free = [p for p in hits if p not in taken]
    if not free:
      raise UsageError(
        f"`{where}.target` {entry['target']!r} of `quantize` selects nothing: its tables "
        f"({', '.join(hits)}) are taken by an earlier override. Overrides are first-match: put "
        "the more specific one first."
      )
    skip = entry.get("skip", False)
    if not isinstance(skip, bool) or (skip and set(entry) - {"target", "skip"}):
      raise UsageError(
        f"`{where}.skip` of `quantize` keeps its tables float: it must be true or false, and "
        f"with `skip: true` only `target` may be set; got {entry!r}."
      )
    spec = None if skip else _table_spec({**base, **entry}, where)
    specs.update(dict.fromkeys(free, spec))
    taken.update(free)
  return {path: spec for path, spec in specs.items() if spec is not None}


def embedding_tables(pipeline: Any, options: dict[str, Any], layers) -> dict:
  """`{path: QuantSpec}` of the tables `embeddings` quantizes: leaves read by row lookups."""
  if options["embeddings"] is None:
    return {}
  sample = first_batch(pipeline)
  uses = gather_tables(pipeline.model.apply, pipeline.tree, sample)
  if not uses:
    raise UsageError(
      "`embeddings` of `quantize` is set, but the model reads no parameter by gather (no "
      "embedding table). Remove `embeddings`."
    )
  twice = sorted(set(uses) & set(layers))
  if twice:
    raise UsageError(
      f"`{twice[0]}` is an embedding table (read by gather) and is also selected by `target`; "
      "`embeddings` quantizes it per row. Exclude it from `target` (e.g. `exclude: "
      f"'{twice[0]}'`), or remove `embeddings`."
    )
  # A table gathered some other way (sliced, transposed, batched) is left float.
  return table_specs(options, [path for path, use in uses.items() if use.rows])
