"""How much each kernel costs and hurts under each candidate, measured once and cached.

For every candidate the whole model is compressed uniformly by the same stages a recipe runs
(`candidates.assignment_stages`), which gives each kernel's stored bytes exactly. The error of
a kernel under a candidate is then measured at the model's output: the kernel alone is
replaced by its decoded compressed weights, every other kernel stays as it came in, and the
error is the squared distance of the outputs from the uncompressed model's, relative to the
outputs' squared norm, on calibration inputs. Measuring at the output (not at the layer)
weighs each kernel by how much the layers after it amplify its error; interactions between
kernels are left to the search's verification, which evaluates the assembled model.

Results are cached under `<cache>/search/` (JSON), keyed by the model, its parameters, the
kernels, candidates, methods and calibration settings, so a second search with another budget
costs only its verifications.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.encoding import materialize
from jaxshrink.report import leaf_report, tree_report
from jaxshrink.search.candidates import Candidate, assignment_stages
from jaxshrink.tree import flatten, map_with_path

CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Sensitivity:
  """Per kernel and candidate name: `errors` (relative output error) and `bytes` (stored).

  `rest_bytes` is what the rest of the tree stores next to the searched kernels (with the
  search's `embeddings` applied), so a kernel assignment's total is `rest_bytes` plus its
  kernels' bytes.
  """

  errors: dict[str, dict[str, float]]
  bytes: dict[str, dict[str, int]]
  rest_bytes: int
  seconds: float = 0.0
  times: dict[str, dict[str, float]] | None = None
  cached: bool = False

  def to_json(self) -> dict[str, Any]:
    return {"errors": self.errors, "bytes": self.bytes, "rest_bytes": self.rest_bytes,
            "seconds": self.seconds, "times": self.times}  # fmt: skip


def cache_key(parts: dict[str, Any], tree: Any) -> str:
  """A digest of the settings and of every array in `tree` (values, shapes and dtypes)."""
  digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
  for path, leaf in sorted(flatten(tree).items()):
    for array in jax.tree.leaves(leaf):
      a = np.asarray(array)
      digest.update(f"{path}{a.shape}{a.dtype}".encode())
      digest.update(np.ascontiguousarray(a).tobytes())
  return digest.hexdigest()[:32]


def _relative_error(apply_fn: Callable) -> Callable:
  def error(tree: Any, x: Any, reference: Any) -> tuple[jax.Array, jax.Array]:
    out = jax.tree.leaves(apply_fn(tree, x))
    pairs = zip(out, reference, strict=True)
    diff = sum(jnp.sum(jnp.square(o.astype(jnp.float32) - r)) for o, r in pairs)
    norm = sum(jnp.sum(jnp.square(r)) for r in reference)
    return diff, norm

  return jax.jit(error)


def measure(
  pipeline: Any,
  paths: list[str],
  candidates: list[Candidate],
  methods: dict[str, str],
  *,
  run_stage: Callable,
  apply_fn: Callable,
  batches: list,
  tables: list[str] = (),
  embeddings: Any = None,
  calibration_batches: int = 8,
  progress: Any = None,
  time_mode: str | None = None,
  time_rows: int = 0,
) -> Sensitivity:
  """Bytes and output error of every kernel in `paths` under every candidate.

  Args:
    pipeline: the search stage's pipeline; its tree is the starting point.
    paths: the searched kernels.
    tables: the searched gathered tables; each is measured under the candidates that fit it
      (`Candidate.fits_table`).
    candidates, methods: as parsed by `candidates`.
    run_stage: `(pipeline, kind, options) -> pipeline` (`jaxshrink.pipeline.run_stage`).
    apply_fn: runs trees that hold encodings (the serving apply).
    batches: inputs the errors are measured on (calibration data).
    embeddings, calibration_batches: passed to `assignment_stages`.
    progress: `(description, total) -> advance()`; None shows nothing.
    time_mode, time_rows: also time each kernel's matmul under each candidate in this serving
      mode on this many input rows (`latency.kernel_seconds`).
  """
  import time

  start = time.perf_counter()
  items = [*paths, *tables]
  base = map_with_path(lambda p, leaf: materialize(leaf) if p in items else leaf, pipeline.tree)
  error = _relative_error(apply_fn)
  references = [[jnp.asarray(o, jnp.float32) for o in jax.tree.leaves(apply_fn(base, x))]
                for x in batches]  # fmt: skip
  errors: dict[str, dict[str, float]] = {p: {} for p in items}
  sizes: dict[str, dict[str, int]] = {p: {} for p in items}
  rest = []
  leaves: dict[str, dict[str, Any]] = {p: {} for p in items}
  flat_base = flatten(base)
  fitting = {
    c.name: [t for t in tables if c.fits_table(flat_base[t].shape[-1])] for c in candidates
  }
  steps = sum(1 + len(paths) + len(fitting[c.name]) for c in candidates)
  advance = progress("search: sensitivities", steps) if progress else None
  for candidate in candidates:
    measured = [*paths, *fitting[candidate.name]]
    tree = _uniform(pipeline, paths, fitting[candidate.name], candidate, methods, run_stage,
                    embeddings, calibration_batches)  # fmt: skip
    flat = flatten(tree)
    for path in items:  # a table a candidate does not fit stays as it was: its bytes count
      sizes[path][candidate.name] = leaf_report(path, flat[path]).bytes
    if time_mode:
      for path in measured:
        leaves[path][candidate.name] = flat[path]
    rest.append(tree_report(tree).total_bytes - sum(sizes[p][candidate.name] for p in items))
    if advance:
      advance()
    for path in measured:
      dense = jnp.asarray(materialize(flat[path]), flat_base[path].dtype)
      swapped = map_with_path(lambda p, leaf, d=dense, q=path: d if p == q else leaf, base)
      diff = norm = 0.0
      for x, reference in zip(batches, references, strict=True):
        d, n = error(swapped, x, reference)
        diff, norm = diff + float(d), norm + float(n)
      errors[path][candidate.name] = diff / max(norm, 1e-30)
      if advance:
        advance()
  times = None
  if time_mode:
    from jaxshrink.search.latency import kernel_seconds

    times = kernel_seconds(leaves, time_rows, time_mode)
  seconds = round(time.perf_counter() - start, 3)
  return Sensitivity(errors, sizes, int(min(rest)), seconds, times)


def _uniform(pipeline, paths, tables, candidate, methods, run_stage, embeddings,
             calibration_batches):  # fmt: skip
  """The tree with every kernel in `paths` and every table in `tables` stored as `candidate`,
  by the recipe stages."""
  if candidate.name == "float":
    return pipeline.tree
  quantizes = candidate.bits and not candidate.nm
  stages = assignment_stages(
    dict.fromkeys(paths, candidate), methods,
    tables=dict.fromkeys(tables, candidate),
    embeddings=embeddings if quantizes else None, calibration_batches=calibration_batches,
  )  # fmt: skip
  for kind, options in stages:
    pipeline = run_stage(pipeline, kind, options)
  return pipeline.tree


def load_cached(directory: Any, key: str) -> Sensitivity | None:
  path = directory / f"{key}.json"
  try:
    raw = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  if raw.get("version") != CACHE_VERSION:
    return None
  return Sensitivity(
    raw["errors"], raw["bytes"], int(raw["rest_bytes"]), raw["seconds"], raw.get("times"), True
  )


def store(directory: Any, key: str, sensitivity: Sensitivity) -> None:
  from jaxshrink.data.cache import atomic_write_bytes

  directory.mkdir(parents=True, exist_ok=True)
  payload = {"version": CACHE_VERSION, **sensitivity.to_json()}
  atomic_write_bytes(directory / f"{key}.json", json.dumps(payload).encode())
