"""Checkpoint bytes on disk: jaxshrink encodings vs the float32 checkpoint, Qwix and AQT.

Every checkpoint is written to disk and measured with `du`-style byte counts of all its files
(metadata included), in the same run:

- jaxshrink: `jaxshrink.save` of the float32 params and of each encoding over every kernel
  (`.*kernel`; digits-cnn's 9-input first conv is left dense where N:M needs 4 | inputs);
- Qwix 0.1.8 PTQ (`qwix.quantize_model` + `qwix.quantize_params`, absmax, the int4 rows with
  `tile_size` as the group) saved the way a user would, `orbax StandardCheckpointer`;
- AQT (aqtp 0.9.0) serving conversion: every Dense through `AqtDotGeneral` with
  `rhs_quant_mode=CONVERT` and frozen values, as in AQT's own flax example; the converted
  variables (`params` + `aqt`) saved with `StandardCheckpointer`.

Peers are compared with the float32 params saved the same way (`StandardCheckpointer`), and
with jaxshrink's float32 checkpoint (`extra`).
"""

from __future__ import annotations

import functools
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink import export, models
from jaxshrink.bench import Record
from jaxshrink.lowrank import factorize, quantize_factors
from jaxshrink.quant import QuantSpec
from jaxshrink.quant.ptq import quantize_params
from jaxshrink.sparsity.encodings import encode_sparse
from jaxshrink.sparsity.structures import NM
from jaxshrink.tree import flatten, map_with_path

SUITE = "checkpoint_size"
DESCRIPTION = (
  "Bytes on disk (every file, metadata included) of the same model's checkpoint: jaxshrink "
  "encodings of every kernel vs jaxshrink's float32 checkpoint (`ratio`), and Qwix 0.1.8 PTQ "
  "and AQT (aqtp 0.9.0) serving checkpoints saved with orbax `StandardCheckpointer`, their "
  "ratio against the float32 params saved the same way."
)
MODELS = ("tiny-lm", "digits-cnn")
KERNELS = ".*kernel"
NM_KERNELS = "(?!conv1/).*kernel"  # digits-cnn conv1 has 1 input channel: no 4 | inputs
QWIX = "qwix 0.1.8"
AQT = "aqtp 0.9.0"


def _magnitude_prune(params: Any, sparsity: float) -> Any:
  def prune(path: str, w: Any) -> Any:
    if not re.fullmatch(KERNELS, path):
      return w
    w = np.asarray(w)
    return w * (np.abs(w) > np.quantile(np.abs(w), sparsity))

  return map_with_path(prune, params)


def _jaxshrink_variants(params: Any) -> dict[str, Any]:
  lowrank = factorize(params, KERNELS, budget=0.5)
  pruned = _magnitude_prune(params, 0.9)
  return {
    "int8 per-channel": quantize_params(params, KERNELS, QuantSpec(bits=8)),
    "int4 g128": quantize_params(params, KERNELS, QuantSpec(bits=4, group_size=128)),
    "int4 g32": quantize_params(params, KERNELS, QuantSpec(bits=4, group_size=32)),
    "2:4": encode_sparse(params, NM_KERNELS, structure=NM(2, 4)),
    "2:4 + int4": encode_sparse(params, NM_KERNELS, structure=NM(2, 4), quantize_nonzeros=4),
    "90% sparse": encode_sparse(pruned, KERNELS),
    "90% sparse + int8": encode_sparse(pruned, KERNELS, quantize_nonzeros=8),
    "low-rank 50%": lowrank,
    "low-rank 50% + int8": quantize_factors(lowrank, bits=8),
  }


def _orbax_save(tree: Any, directory: Path) -> int:
  import orbax.checkpoint as ocp

  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(directory, tree)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()
  return export.disk_bytes(directory)


def _stored_bytes(tree: Any) -> int:
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _qwix_trees(model, params: Any) -> dict[str, Any]:
  import qwix

  ops = {"op_names": ("dot_general",)} if model.name == "digits-cnn" else {}
  configs = {
    "int8 per-channel": ("int8", None),
    "int4 per-channel": ("int4", None),
    "int4 g128": ("int4", 128),
    "int4 g32": ("int4", 32),
  }
  out = {}
  for label, (qtype, tile) in configs.items():
    rules = [qwix.QuantizationRule(module_path=".*", weight_qtype=qtype, tile_size=tile, **ops)]
    try:
      module = qwix.quantize_model(model.module, qwix.PtqProvider(rules))
      abstract = jax.eval_shape(module.init, jax.random.key(0), model.dummy_input(1))["params"]
      out[label] = qwix.quantize_params(params, abstract)
    except Exception as e:  # noqa: BLE001  (a peer's failure is a result, recorded as such)
      out[label] = f"{type(e).__name__}: {e}"[:200]
  return out


def _aqt_serving(params: Any, bits: int) -> dict[str, Any]:
  """AQT's serving conversion of every 2-D kernel (a Dense), as its flax example does it."""
  import flax.linen as nn
  from aqt.jax.v2 import utils as aqt_utils
  from aqt.jax.v2.flax import aqt_flax

  from jaxshrink.quant.aqt_interop import aqt_config

  dot_general_cls = functools.partial(
    aqt_flax.AqtDotGeneral,
    aqt_config(bits),
    lhs_quant_mode=aqt_utils.QuantMode.TRAIN,
    rhs_quant_mode=aqt_utils.QuantMode.CONVERT,
    rhs_freeze_mode=aqt_flax.FreezerMode.CALIBRATION_AND_VALUE,
    use_legacy_freezer=False,
  )
  frozen = {}
  for path, kernel in flatten(params).items():
    if not path.endswith("kernel") or kernel.ndim != 2:
      continue  # AQT's dot_general covers Dense; convs stay float (noted in `extra`)
    layer = nn.Dense(kernel.shape[1], dot_general_cls=dot_general_cls)
    variables = {"params": {"kernel": kernel, "bias": jnp.zeros(kernel.shape[1])}}
    _, converted = layer.apply(
      variables, jnp.ones((1, kernel.shape[0])), mutable=True, rngs={"params": jax.random.key(0)}
    )
    frozen[path.replace("/", "__")] = converted["aqt"]
  # What AQT serves from: the float params are kept beside the frozen integer weights.
  return {"params": params, "aqt": frozen}


def _row(model, method, disk, reference_disk, seconds, extra) -> Record:
  return Record(
    SUITE, model.name, method, "bytes on disk", float(disk), float(reference_disk), disk,
    reference_disk, seconds, extra,
  )  # fmt: skip


def _model_rows(model, params, tmp: Path) -> list[Record]:
  rows = []
  f32_js = export.disk_bytes(export.save(tmp / "js-float32", params))
  f32_orbax = _orbax_save(params, tmp / "orbax-float32")
  rows.append(_row(model, "float32 (jaxshrink)", f32_js, f32_js, None, {"library": "jaxshrink"}))
  rows.append(_row(
    model, "float32 (orbax StandardCheckpointer)", f32_orbax, f32_orbax, None,
    {"library": "orbax", "ratio_vs_jaxshrink_float32": round(f32_js / f32_orbax, 4)},
  ))  # fmt: skip
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # group fallbacks on small convs are expected
    variants = _jaxshrink_variants(params)
  for label, tree in variants.items():
    start = time.perf_counter()
    directory = export.save(tmp / f"js-{label}", tree)
    seconds = time.perf_counter() - start
    disk = export.disk_bytes(directory)
    stored = export.read_manifest(directory)["totals"]["total_bytes"]
    extra = {"library": "jaxshrink", "stored_array_bytes": stored, "metadata_bytes": disk - stored}
    rows.append(_row(model, f"jaxshrink {label}", disk, f32_js, seconds, extra))
  scope = "Dense kernels (convs stay float)" if model.name == "digits-cnn" else "every kernel"
  for label, tree in _qwix_trees(model, params).items():
    extra = {"library": QWIX, "reference": "float32 via StandardCheckpointer", "scope": scope}
    if isinstance(tree, str):
      extra["error"] = tree
      rows.append(Record(SUITE, model.name, f"qwix {label}", "bytes on disk", None, f32_orbax,
                         None, f32_orbax, None, extra))  # fmt: skip
      continue
    start = time.perf_counter()
    disk = _orbax_save(tree, tmp / f"qwix-{label}")
    extra.update(stored_array_bytes=_stored_bytes(tree),
                 ratio_vs_jaxshrink_float32=round(f32_js / disk, 4))  # fmt: skip
    rows.append(_row(model, f"qwix {label}", disk, f32_orbax, time.perf_counter() - start, extra))
  for bits in (8,):  # int8 only: saving AQT's int4 conversion with orbax hangs in tensorstore
    tree = _aqt_serving(params, bits)
    start = time.perf_counter()
    disk = _orbax_save(tree, tmp / f"aqt-{bits}")
    float_kept = _stored_bytes(tree["params"])
    extra = {
      "library": AQT,
      "reference": "float32 via StandardCheckpointer",
      "scope": "Dense kernels" + (" (convs stay float)" if model.name == "digits-cnn" else ""),
      "stored_array_bytes": _stored_bytes(tree),
      "float_params_kept_bytes": float_kept,
      "ratio_vs_jaxshrink_float32": round(f32_js / disk, 4),
    }
    rows.append(_row(model, f"aqt int{bits} serving (converted)", disk, f32_orbax,
                     time.perf_counter() - start, extra))  # fmt: skip
  return rows


def run() -> list[Record]:
  records = []
  tmp = Path(tempfile.mkdtemp(prefix="jaxshrink-ckpt-size-"))
  try:
    for name in MODELS:
      model = models.get_model(name)
      params = models.pretrained(model, progress=False)
      records += _model_rows(model, params, tmp / name)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return records


def summarize(records: list[Record]) -> str:
  """One line per model: the best jaxshrink ratio and the peers' int8/int4 ratios."""
  lines = []
  for name in dict.fromkeys(r.model for r in records):
    rows = {r.method: r for r in records if r.model == name and r.size_bytes}

    def ratio(method: str, rows: dict[str, Record] = rows) -> str:
      r = rows.get(method)
      return f"{r.float32_bytes / r.size_bytes:.2f}x" if r else "n/a"

    lines.append(
      f"{name}: jaxshrink int8 {ratio('jaxshrink int8 per-channel')}, int4 g128 "
      f"{ratio('jaxshrink int4 g128')}, 2:4+int4 {ratio('jaxshrink 2:4 + int4')}; Qwix int8 "
      f"{ratio('qwix int8 per-channel')}, int4 g32 {ratio('qwix int4 g32')}; AQT int8 serving "
      f"{ratio('aqt int8 serving (converted)')}."
    )
  return " ".join(lines)
