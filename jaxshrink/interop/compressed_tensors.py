"""compressed-tensors checkpoints (the format vLLM and transformers load) both ways.

Export writes a Hugging Face directory whose quantized Linear weights keep their codes: a
`QArray` kernel `(K, N)` becomes PyTorch's `(N, K)` layout, as

- `pack-quantized` (W4A16, W8A16): `weight_packed` int32 `(N, ceil(K*b/32))` (`ct_pack`),
  `weight_scale` `(N, G)`, `weight_shape` int64 `[N, K]`, and for asymmetric codes
  `weight_zero_point` packed the same way along the output axis: int32 `(ceil(N*b/32), G)`;
- `int-quantized` (W8A8): `weight` int8 `(N, K)`, `weight_scale` `(N, 1)` (or `(1,)`
  per-tensor) and, for static activations, `input_scale` `(1,)`.

Scales are written as float32 whatever their dtype here: bf16 values are exact in float32, and
compressed-tensors dequantizes in the scale's dtype, so its `(codes - zero_point) * scale`
equals `QArray.dequantized_matrix()` bit for bit. One `config_groups` entry per distinct scheme
names its modules in `targets`; float Linear modules are listed in `ignore` (vLLM needs every
Linear either targeted or ignored). Writing needs NumPy and safetensors only, never torch.

Not expressible, refused with a `UsageError` naming the layer and the scheme: AWQ /
SmoothQuant `input_scale` (no tensor for it), int3 / int2 and fp8 codes, per-tensor weight-only
scales, activation bits other than 8, W4A8, grouped or asymmetric W8A8 weights (vLLM's int8
kernels take per-channel or per-tensor symmetric weights), groups that do not divide `K`, and
stacked (scanned) kernels. compressed-tensors 0.20 has no sparse compressor (`sparse-24-bitmask`
is legacy, unsupported since 0.14): 2:4-pruned kernels are written as their values, float or
quantized, with their zeros but without a sparsity declaration. Quantized embedding tables are
written dequantized (a warning says so): compressed-tensors and vLLM quantize Linear layers.

>>> q = quantize(w, QuantSpec(bits=4, group_size=128))  # w: a (K, N) Dense kernel
>>> tensors, config = compressed_state({"l.weight": (q, True)})
>>> config["format"], sorted(tensors)
('pack-quantized', ['l.weight_packed', 'l.weight_scale', 'l.weight_shape'])
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import numpy as np

from jaxshrink.encoding import is_encoding, materialize
from jaxshrink.errors import UsageError
from jaxshrink.interop.ct_pack import pack_int32
from jaxshrink.quant.qarray import QArray

CT_VERSION = "0.20.0"  # the compressed-tensors release whose format this writes (and tests read)
PACKED, INT, NAIVE, MIXED = "pack-quantized", "int-quantized", "naive-quantized", "mixed-precision"
_FIX = "Export with `--to hf` (dequantized float) or `--to safetensors` instead, or requantize"


@dataclasses.dataclass(frozen=True)
class Scheme:
  """One compressed-tensors weight (and activation) scheme; one `config_groups` entry each.

  Attributes:
    bits: weight code width. symmetric: no zero point.
    strategy: `group`, `channel` or `tensor`. group_size: rows of `K` per scale (group only).
    act: None (weight-only), `dynamic` (int8 per token) or `static` (int8, one `input_scale`).
  """

  bits: int
  symmetric: bool
  strategy: str
  group_size: int | None = None
  act: str | None = None

  @property
  def format(self) -> str:
    return INT if self.act else PACKED

  def describe(self) -> str:
    gran = f"g{self.group_size}" if self.strategy == "group" else f"per-{self.strategy}"
    act = f", {self.act} int8 activations" if self.act else ""
    return f"W{self.bits}A{8 if self.act else 16} {gran} {'sym' if self.symmetric else 'asym'}{act}"

  def config(self, targets: list[str]) -> dict[str, Any]:
    dynamic = self.act == "dynamic"
    weights = {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
               "group_size": self.group_size, "strategy": self.strategy,
               "dynamic": False}  # fmt: skip
    inputs = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
              "strategy": "token" if dynamic else "tensor", "dynamic": dynamic}  # fmt: skip
    return {"targets": targets, "weights": weights, "input_activations": inputs if self.act
            else None, "output_activations": None, "format": self.format}  # fmt: skip


def _refuse(module: str, what: str, why: str, fix: str) -> UsageError:
  return UsageError(f"`{module}` ({what}) cannot be written as compressed-tensors: {why}. {fix}.")


def _dividing_group(k: int) -> str:
  fits = [g for g in (128, 64, 32, 16, 8) if k % g == 0]
  return str(fits[0]) if fits else "None (per-channel)"


def scheme_of(module: str, q: QArray) -> Scheme:
  """The compressed-tensors scheme of a Linear kernel `q`.

  Raises:
    UsageError: naming `module`, `q`'s scheme and the fix, for what the format cannot express.
  """
  refusals = [
    (q.layers is not None, f"it stacks {q.layers} layers on one axis",
     "Unstack it into one kernel per layer before exporting"),
    (q.input_scale is not None, "its AWQ/SmoothQuant `input_scale` (a per-input-row divisor) "
     "has no compressed-tensors equivalent", "Quantize with a `gptq` or `rtn` recipe (no "
     "input_scale) for this export"),
    (q.format != "int", f"{q.format} codes are not exported (the fp8 formats cannot be "
     "checked on CPU)", f"{_FIX} to int8 or int4"),
    (q.bits not in (4, 8), f"int{q.bits} weights have no vLLM compressed-tensors kernel "
     "(W4A16, W8A16 and W8A8 do)", f"{_FIX} to 4 or 8 bits"),
    (q.act_bits not in (None, 8) or (q.act_bits == 8 and q.bits != 8), f"W{q.bits}A"
     f"{q.act_bits} is not served from compressed-tensors (activations are 16-bit, or int8 "
     "with int8 weights)", f"{_FIX} as W4A16, W8A16 or W8A8"),
    (q.act_bits == 8 and (q.group_size is not None or not q.symmetric), "W8A8 weights must be "
     "symmetric per-channel or per-tensor for vLLM's int8 kernels", f"{_FIX} with "
     "QuantSpec(bits=8) (per-channel, symmetric)"),
    (q.per_tensor and q.act_bits is None, "weight-only kernels need per-channel or per-group "
     "scales", f"{_FIX} with group_size=128 (W4A16) or per-channel"),
    (q.group_size is not None and q.k % q.group_size, f"group size {q.group_size} does not "
     f"divide K={q.k} (the format, like vLLM's kernels, takes whole groups only)",
     f"{_FIX} with group_size {_dividing_group(q.k)}, which divides {q.k}"),
  ]  # fmt: skip
  for refused, why, fix in refusals:
    if refused:
      raise _refuse(module, q.describe(), why, fix)
  strategy = "tensor" if q.per_tensor else "channel" if q.group_size is None else "group"
  act = None if q.act_bits is None else ("static" if q.act_scale is not None else "dynamic")
  return Scheme(q.bits, q.symmetric, strategy, q.group_size, act)


def _host(x: Any, dtype: Any = None) -> np.ndarray:
  array = np.asarray(jax.device_get(x))
  return array if dtype is None else array.astype(dtype)


def quantized_tensors(module: str, q: QArray, scheme: Scheme) -> dict[str, np.ndarray]:
  """The safetensors entries of one quantized Linear module (`module` + `.weight_*`)."""
  codes = _host(q.unpacked_codes(), np.int8).T  # (N, K)
  scale = _host(q.scale, np.float32).T  # (N, G); exact: bf16 -> float32 loses nothing
  out = {f"{module}.weight_scale": scale.reshape(1) if scheme.strategy == "tensor" else scale}
  if scheme.format == INT:
    out[f"{module}.weight"] = codes
    if scheme.act == "static":
      out[f"{module}.input_scale"] = _host(q.act_scale, np.float32).reshape(1)
  else:
    out[f"{module}.weight_packed"] = pack_int32(codes, q.bits)
    out[f"{module}.weight_shape"] = np.array([q.n, q.k], np.int64)
    if not q.symmetric:
      out[f"{module}.weight_zero_point"] = pack_int32(_host(q.zero_point, np.int8).T, q.bits, 0)
  return {name: np.ascontiguousarray(array) for name, array in out.items()}


def _holds_qarray(leaf: Any) -> bool:
  children = leaf.children().values()
  return any(isinstance(x, QArray) or (is_encoding(x) and _holds_qarray(x)) for x in children)


# vLLM runs these Llama projections as one fused matmul, so it needs one scheme for all of them.
_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _check_fused(schemes: dict[str, Scheme | None]) -> None:
  for module in schemes:
    prefix, _, last = module.rpartition(".")
    for shards in _FUSED:
      names = [f"{prefix}.{shard}" for shard in shards]
      found = {schemes[n].describe() if schemes[n] else "float" for n in names if n in schemes}
      if last == shards[0] and len(found) > 1:
        warnings.warn(
          f"`{prefix}`: {'/'.join(shards)} have different schemes ({', '.join(sorted(found))}); "
          "vLLM fuses them into one matmul and refuses that. Quantize them alike for vLLM.",
          stacklevel=3,
        )


def compressed_state(state: dict[str, tuple[Any, bool]]) -> tuple[dict[str, np.ndarray], dict]:
  """`{HF tensor name: (leaf, transposed)}` -> (`{safetensors name: array}`, quantization_config).

  Args:
    state: per HF tensor, our leaf (a float array, a `QArray` or another encoding) and whether
      the HF tensor is its transpose (True for every Linear kernel). A quantized Linear's name
      ends in `.weight`; its module name is the name without it.

  Returns:
    The tensors to save (float leaves as they are, transposed where flagged) and the
    `quantization_config` entry of `config.json`.

  Raises:
    UsageError: a leaf the format cannot express (see the module docstring), or no quantized
      Linear kernel at all.
  """
  tensors: dict[str, np.ndarray] = {}
  groups: dict[Scheme, list[str]] = {}
  schemes: dict[str, Scheme | None] = {}  # per Linear module; None: float
  ignore, tables = [], []
  for name, (leaf, transposed) in state.items():
    if isinstance(leaf, QArray) and not leaf.table:
      module = name.removesuffix(".weight")
      linear = transposed and name.endswith(".weight") and leaf.contract_dims == (0,)
      if not linear or len(leaf.shape) != 2:
        why = "only Linear kernels (K, N) are quantized in compressed-tensors"
        raise _refuse(name, leaf.describe(), why, f"{_FIX} with this leaf excluded from the rule")
      schemes[module] = scheme = scheme_of(module, leaf)
      tensors.update(quantized_tensors(module, leaf, scheme))
      groups.setdefault(scheme, []).append(module)
      continue
    if isinstance(leaf, QArray):
      tables.append(name)
    elif is_encoding(leaf) and _holds_qarray(leaf):
      raise _refuse(name, leaf.describe(), "compressed-tensors 0.20 defines no sparse + "
                    "quantized format (sparse-24-bitmask is gone since 0.14)", "Store the pruned "
                    "kernel densely (prune, then quantize without the N:M encoding)")  # fmt: skip
    array = _host(materialize(leaf) if is_encoding(leaf) else leaf)
    tensors[name] = np.ascontiguousarray(array.T if transposed else array)
    if transposed and name.endswith(".weight"):
      ignore.append(name.removesuffix(".weight"))
      schemes[name.removesuffix(".weight")] = None
  _check_fused(schemes)
  if not groups:
    raise UsageError(
      "No quantized Linear kernel to write: compressed-tensors describes quantized weights. "
      "Export a float model with `--to hf`, or quantize it first (e.g. a `gptq` recipe)."
    )
  if tables:
    why = "compressed-tensors and vLLM quantize Linear layers only"
    warnings.warn(
      f"Quantized embedding tables {tables} are written dequantized: {why}.", stacklevel=2
    )
  formats = {scheme.format for scheme in groups}
  # The keys compressed-tensors' own `ModelCompressor.update_config` writes.
  config = {
    "quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else MIXED,
    "quantization_status": "compressed", "ignore": ignore, "kv_cache_scheme": None,
    "config_groups": {f"group_{i}": s.config(m) for i, (s, m) in enumerate(groups.items())},
    "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
    "version": CT_VERSION,
  }  # fmt: skip
  return tensors, config
