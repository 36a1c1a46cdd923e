"""Hugging Face checkpoints both ways: `config.json` + `model.safetensors` for Llama and BERT.

`export_hf(tree, model, out)` writes a directory `transformers` loads with
`AutoModelForCausalLM.from_pretrained(out)` (Llama / Qwen2 decoders) or `AutoModel` (BERT
encoders); compressed leaves are written as their dequantized float values, so the export is
the model the checkpoint computes. `from_hf(path)` is the reverse: a `ZooModel` whose weights
are the checkpoint's, for recipes (`model: hf:PATH`), `eval` and Python. Reading needs NumPy and
safetensors only, never torch, and imports no code a checkpoint names: `config.json` is data,
checked field by field against what our architectures compute.

The name maps live beside the models (`models.llama_hf`, `models.bert_hf`); the packaged
all-MiniLM-L6-v2 weights load through `load_hf` like any other BERT directory. A
compressed-tensors directory (a `quantization_config` in `config.json`) loads with `QArray`
leaves (`jaxshrink.interop.compressed_tensors`).

>>> export_hf(pretrained("llama-tiny"), get_model("llama-tiny"), "out/tiny-hf")  # doctest: +SKIP
>>> from_hf("out/tiny-hf").name                                               # doctest: +SKIP
'hf:/.../out/tiny-hf'
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxshrink.encoding import is_encoding, materialize
from jaxshrink.errors import CheckpointError, UsageError
from jaxshrink.interop.directory import EXPORT_KEY, hf_directory
from jaxshrink.interop.hf_config import (
  LLAMA_TYPES,
  bert_from_config,
  bert_to_hf,
  llama_from_config,
  llama_to_hf,
)
from jaxshrink.models import bert_hf, llama_hf
from jaxshrink.models.base import HF_PREFIX, TRAINING_DEFAULTS, TRAINING_FIELDS, ZooModel, zoo_model
from jaxshrink.models.bert import BertConfig, BertEncoder
from jaxshrink.models.llama import LlamaConfig, LlamaForCausalLM

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # a checkpoint sharded over several files
_CONFIG_LIMIT = 1 << 20
_DEFAULT_CONTEXT = 128  # example length of an imported decoder's `input_shape`
_RECIPE_FIELDS = (*TRAINING_FIELDS, "weight_decay", "warmup_steps", "data", "metric")


def architecture(model: ZooModel) -> LlamaConfig | BertConfig:
  """The `LlamaConfig` or `BertConfig` a zoo model's module is built from.

  Raises:
    UsageError: the model is neither a `LlamaForCausalLM` nor a `BertEncoder`.
  """
  module = model.module
  if isinstance(module, functools.partial) and module.func in (LlamaForCausalLM, BertEncoder):
    for arg in (*module.args, *module.keywords.values()):
      if isinstance(arg, (LlamaConfig, BertConfig)):
        return arg
  raise UsageError(
    f"model {model.name!r} is not a Llama decoder or a BERT encoder, the architectures with a "
    "Hugging Face counterpart; export it with `--to safetensors` (jaxshrink's own layout)."
  )


def hf_config(model: ZooModel) -> dict[str, Any]:
  """The `config.json` of `model` as a dict, with a `jaxshrink` entry holding its zoo recipe
  (data, metric, training fields, example shape), so a re-import evaluates like the original.

  Raises:
    UsageError: the model has no Hugging Face counterpart (see `architecture`).
  """
  arch = architecture(model)
  config = llama_to_hf(arch) if isinstance(arch, LlamaConfig) else bert_to_hf(arch)
  recipe = {field: getattr(model, field) for field in _RECIPE_FIELDS}
  recipe.update(model=model.name, input_shape=list(model.input_shape), torch_dtype="float32")
  return {**config, "torch_dtype": "float32", EXPORT_KEY: recipe}


def hf_state(tree: Any, model: ZooModel) -> dict[str, tuple[Any, bool]]:
  """`{HF tensor name: (leaf, transposed)}` of a param tree (float or compressed leaves);
  `transposed` says the HF tensor is the leaf's transpose (every Linear kernel).

  Raises:
    UsageError: the model has no Hugging Face counterpart.
    InvalidValueError / CheckpointError: a param has no Hugging Face name.
  """
  arch = architecture(model)
  if isinstance(arch, BertConfig):
    return bert_hf.to_hf_state(tree, arch)
  from jaxshrink.tree import flatten

  state = {}
  for path, leaf in flatten(tree).items():
    name, transposed = llama_hf.to_hf_name(path)
    state[name] = (leaf, transposed)
  return state


def export_hf(
  tree: Any,
  model: ZooModel,
  out: str | os.PathLike,
  *,
  overwrite: bool = False,
  tokenizer: dict[str, str] | None = None,
) -> Path:
  """Writes `tree` as a Hugging Face float checkpoint directory, atomically.

  Compressed leaves (quantized, sparse, low-rank) are written as the float values they
  decode to, in their logical dtype; float leaves keep theirs (float32, or bf16 after a cast).

  Args:
    tree: the model's param tree, float or compressed.
    model: the zoo model it belongs to (a Llama decoder or a BERT encoder).
    out: the directory to write (`config.json`, `model.safetensors`).
    overwrite: replace an existing directory that an earlier export wrote.
    tokenizer: `{file name: text}` written beside the weights (`tokenizer.json`,
      `tokenizer_config.json`; `jaxshrink.data.registry.tokenizer_files`), or None.

  Returns:
    `out` as an absolute path.

  Raises:
    UsageError: `out` exists and may not be replaced, or the model has no HF counterpart.
  """
  config = hf_config(model)
  tensors = {}
  for name, (leaf, transposed) in hf_state(tree, model).items():
    array = np.asarray(jax.device_get(materialize(leaf) if is_encoding(leaf) else leaf))
    tensors[name] = np.ascontiguousarray(array.T if transposed else array)
  return _write(out, config, tensors, overwrite, tokenizer)


def export_compressed_tensors(
  tree: Any,
  model: ZooModel,
  out: str | os.PathLike,
  *,
  overwrite: bool = False,
  tokenizer: dict[str, str] | None = None,
) -> Path:
  """Writes `tree` as a compressed-tensors directory (the format vLLM and transformers load),
  atomically: `config.json` with its `quantization_config`, and `model.safetensors` whose
  quantized Linear weights keep their codes (`jaxshrink.interop.compressed_tensors`).

  Args:
    tree: the compressed param tree of `model` (QArray kernels, float elsewhere).
    model: its zoo model (a Llama decoder or a BERT encoder).
    out: the directory to write.
    overwrite: replace a directory an earlier export wrote.
    tokenizer: tokenizer files to write beside the weights, as for `export_hf`.

  Returns:
    `out` as an absolute path.

  Raises:
    UsageError: a scheme compressed-tensors cannot express (named with its layer), a model
      without a Hugging Face counterpart, or an `out` that may not be replaced.
  """
  from jaxshrink.interop.compressed_tensors import compressed_state

  config = hf_config(model)
  tensors, quantization = compressed_state(hf_state(tree, model))
  if any(not g["weights"]["symmetric"] for g in quantization["config_groups"].values()):
    warnings.warn(
      "asymmetric weights (zero points): transformers 5 with compressed-tensors 0.20 loads this "
      "directory only with `quantization_config=CompressedTensorsConfig(dequantize=True)` "
      "(its default path rejects packed zero points); vLLM loads it as it is. A symmetric "
      "recipe avoids the workaround.",
      stacklevel=2,
    )
  config = {**config, "quantization_config": quantization}
  return _write(out, config, tensors, overwrite, tokenizer)


def _write(
  out: str | os.PathLike, config: dict, tensors: dict, overwrite: bool, tokenizer: dict | None
) -> Path:
  from safetensors.numpy import save_file

  out = Path(out).absolute()
  with hf_directory(out, overwrite=overwrite) as staging:
    save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
    (staging / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    for name, text in (tokenizer or {}).items():
      (staging / name).write_text(text, encoding="utf-8")
  return out


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
  """The `config.json` of a Hugging Face directory.

  Raises:
    CheckpointError: missing, oversized, not JSON, or not a JSON object.
  """
  path = Path(directory) / CONFIG
  if not path.is_file():
    raise CheckpointError(
      f"`{path}` does not exist; a Hugging Face model directory holds `{CONFIG}` beside its "
      f"`{WEIGHTS}`. Pass the directory `save_pretrained` or `jaxshrink export --to hf` wrote."
    )
  try:
    if path.stat().st_size > _CONFIG_LIMIT:
      raise CheckpointError(f"`{path}` is over {_CONFIG_LIMIT} bytes; not a model config.")
    config = json.loads(path.read_bytes())
  except (OSError, ValueError, RecursionError) as e:
    raise CheckpointError(f"cannot read `{path}` as JSON ({type(e).__name__}: {e}).") from None
  if not isinstance(config, dict):
    raise CheckpointError(f"`{path}` holds a JSON {type(config).__name__}, not an object.")
  return config


def read_tensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of a Hugging Face directory (one file, or shards named by the index), as
  NumPy arrays (bf16 and fp8 through ml_dtypes).

  Raises:
    CheckpointError: no weights file, a damaged file, or an index naming a file outside the
      directory.
  """
  from safetensors.numpy import load_file

  directory = Path(directory)
  files = [directory / WEIGHTS]
  if not files[0].is_file() and (directory / INDEX).is_file():
    try:
      weight_map = json.loads((directory / INDEX).read_bytes())["weight_map"]
      names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      where = directory / INDEX
      raise CheckpointError(f"cannot read `{where}` ({type(e).__name__}: {e}).") from None
    for name in names:
      if not isinstance(name, str) or Path(name).name != name:
        raise CheckpointError(
          f"`{directory / INDEX}` names the shard {name!r}, which is not a file name inside the "
          "directory; refusing to read outside it."
        )
    files = [directory / name for name in names]
  tensors: dict[str, np.ndarray] = {}
  for file in files:
    if not file.is_file():
      raise CheckpointError(
        f"`{file}` does not exist; a Hugging Face directory holds `{WEIGHTS}` (or the shards "
        f"its `{INDEX}` lists)."
      )
    try:
      tensors.update(load_file(str(file)))
    except Exception as e:  # safetensors raises its own error types for a damaged file
      raise CheckpointError(f"cannot read `{file}` ({type(e).__name__}: {e}).") from None
  return tensors


def _model(directory: Path, config: dict, arch: LlamaConfig | BertConfig) -> ZooModel:
  recipe = config.get(EXPORT_KEY) if isinstance(config.get(EXPORT_KEY), dict) else {}
  given = {k: recipe[k] for k in _RECIPE_FIELDS if k in recipe}
  decoder = isinstance(arch, LlamaConfig)
  context = min(arch.max_positions, _DEFAULT_CONTEXT if decoder else 32)
  shape = recipe.get("input_shape") or [context]
  fields = {
    **TRAINING_DEFAULTS,
    "data": "",
    "metric": "perplexity" if decoder else "cosine",
    **given,
    "unset": tuple(f for f in TRAINING_FIELDS if f not in given),
  }
  if not decoder:
    fields["pad_id"] = arch.pad_id
  module = functools.partial(LlamaForCausalLM if decoder else BertEncoder, arch)
  kind = "Llama decoder" if decoder else "BERT encoder"
  return zoo_model(
    f"{HF_PREFIX}{directory}", module, tuple(int(n) for n in shape), "int32",
    f"{kind} imported from the Hugging Face directory {directory}", **fields,
  )  # fmt: skip


def _read(path: str | os.PathLike) -> tuple[Path, dict, LlamaConfig | BertConfig]:
  directory = Path(path).absolute()
  config = read_config(directory)
  where = str(directory / CONFIG)
  model_type = config.get("model_type")
  if model_type in LLAMA_TYPES:
    return directory, config, llama_from_config(config, where)
  if model_type == "bert":
    return directory, config, bert_from_config(config, where)
  raise CheckpointError(
    f"`{where}`: model_type {model_type!r} is not supported; jaxshrink imports "
    f"{sorted(LLAMA_TYPES)} decoders and `bert` encoders."
  )


def _params(directory: Path, config: dict, arch: LlamaConfig | BertConfig) -> dict:
  tensors = read_tensors(directory)
  if "quantization_config" in config:
    from jaxshrink.interop.ct_read import read_compressed_state

    tensors = read_compressed_state(tensors, config["quantization_config"])
  # Quantized modules arrive as QArrays in our layout; the float tensors are widened.
  state = {name: x if is_encoding(x) else _widen(x) for name, x in tensors.items()}
  source = f"`{directory}`"
  if isinstance(arch, BertConfig):
    return bert_hf.from_hf_state(state, arch, source=source)
  return _llama_params(state, arch, source)


def load_hf(path: str | os.PathLike) -> tuple[ZooModel, dict]:
  """The model a Hugging Face directory describes, and its param tree.

  Float tensors become float32 params (bf16 / fp16 checkpoints are widened: our models compute
  in float32 and a `cast` stage narrows them again). A compressed-tensors checkpoint keeps its
  quantized Linear weights as `QArray` leaves (`jaxshrink.interop.ct_read`).

  Raises:
    CheckpointError: a missing or damaged file, an architecture or config field we do not
      compute (named, with its value), or tensors that do not fit the config.
  """
  directory, config, arch = _read(path)
  return _model(directory, config, arch), _params(directory, config, arch)


def _widen(array: np.ndarray) -> np.ndarray:
  return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def _llama_params(state: dict[str, Any], arch: LlamaConfig, source: str) -> dict:
  """Llama params from HF tensors (already decoded), each shape checked against the config."""
  from jaxshrink.encoding import logical_shape
  from jaxshrink.tree import flatten

  if arch.tie_embeddings:
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # a tied copy, if saved
  try:
    params = llama_hf.from_hf_state(state)
  except Exception as e:
    raise CheckpointError(f"{source}: {e}") from None
  expected = flatten(jax.eval_shape(_llama_init(arch), jax.random.key(0)))
  got = flatten(params)
  missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
  if missing or extra:
    raise CheckpointError(
      f"{source} does not fit its config: missing {missing[:4]}, unexpected {extra[:4]}."
    )
  for name, want in expected.items():
    if tuple(logical_shape(got[name])) != tuple(want.shape):
      raise CheckpointError(
        f"{source}: param `{name}` has shape {tuple(logical_shape(got[name]))}; its config "
        f"gives {tuple(want.shape)}. The tensors do not match config.json."
      )
  return params


@functools.cache
def _llama_init(arch: LlamaConfig):
  from jaxshrink.models.base import nnx_functions

  return nnx_functions(functools.partial(LlamaForCausalLM, arch))[0]


def from_hf(path: str | os.PathLike) -> ZooModel:
  """A `ZooModel` for a Hugging Face directory, from its `config.json` alone; the tensors are
  read when `pretrained(model)` asks for its weights (compressed-tensors weights decoded to
  float).

  Raises:
    CheckpointError: see `load_hf`.
  """
  directory, config, arch = _read(path)

  def weights() -> dict:
    params = _params(directory, config, arch)
    if any(is_encoding(x) for x in jax.tree.leaves(params, is_leaf=is_encoding)):
      params = materialize(params)
    return jax.tree.map(np.asarray, params)

  return dataclasses.replace(_model(directory, config, arch), weights=weights)
