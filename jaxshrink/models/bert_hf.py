"""The one name map between `BertEncoder` param paths and Hugging Face `BertModel` tensors.

Hugging Face names a Linear's weight `(out, in)` where Flax stores the kernel `(in, out)`, so
kernels are transposed on the way across; LayerNorm `weight` is our `scale`. The map is built
from a `BertConfig`, with each tensor's stored shape, so a checkpoint that does not fit the
configured sizes is named tensor by tensor. Import and export of BERT checkpoints
(`jaxshrink.interop.hf`, and the packaged all-MiniLM-L6-v2 weights) build on `bert_tensor_map`.

>>> from jaxshrink.models.bert import BertConfig
>>> bert_tensor_map(BertConfig())["encoder.layer.0.intermediate.dense.weight"]
(('encoder', 'layer_0', 'intermediate', 'kernel'), (1536, 384), True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxshrink.encoding import is_encoding, logical_shape
from jaxshrink.errors import CheckpointError
from jaxshrink.models.bert import BertConfig
from jaxshrink.tree import flatten

# Tensors a BERT checkpoint may carry that the mean-pooling encoder does not use.
UNUSED_PREFIXES = ("pooler.", "embeddings.position_ids", "cls.")


def bert_tensor_map(config: BertConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
  """`{HF tensor name: (our param path, stored shape, transposed)}` for a BERT of `config`."""
  h = config.hidden_size
  out: dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]] = {}

  def linear(src: str, dst: tuple[str, ...], n_in: int, n_out: int) -> None:
    out[f"{src}.weight"] = (dst + ("kernel",), (n_out, n_in), True)
    out[f"{src}.bias"] = (dst + ("bias",), (n_out,), False)

  def norm(src: str, dst: tuple[str, ...]) -> None:
    out[f"{src}.weight"] = (dst + ("scale",), (h,), False)
    out[f"{src}.bias"] = (dst + ("bias",), (h,), False)

  tables = (("word", config.vocab_size), ("position", config.max_positions),
            ("token_type", config.type_vocab_size))  # fmt: skip
  for table, rows in tables:
    src = f"embeddings.{table}_embeddings.weight"
    out[src] = (("embeddings", f"{table}_embeddings", "embedding"), (rows, h), False)
  norm("embeddings.LayerNorm", ("embeddings", "layer_norm"))
  for n in range(config.num_layers):
    src, dst = f"encoder.layer.{n}", ("encoder", f"layer_{n}")
    inner, wide = config.heads(n) * config.head_size, config.intermediate(n)
    for proj in ("query", "key", "value"):
      linear(f"{src}.attention.self.{proj}", dst + ("attention", proj), h, inner)
    linear(f"{src}.attention.output.dense", dst + ("attention", "output"), inner, h)
    norm(f"{src}.attention.output.LayerNorm", dst + ("attention", "layer_norm"))
    linear(f"{src}.intermediate.dense", dst + ("intermediate",), h, wide)
    linear(f"{src}.output.dense", dst + ("output",), wide, h)
    norm(f"{src}.output.LayerNorm", dst + ("output_norm",))
  return out


def from_hf_state(
  tensors: Mapping[str, Any], config: BertConfig, *, source: str = "the checkpoint"
) -> dict:
  """Hugging Face BERT tensors -> the `BertEncoder` param tree (float32 NumPy leaves).

  Names may carry a `bert.` prefix (a `BertFor...` head model); tensors the encoder does not
  use (the pooler, `position_ids`, a task head) are skipped.

  Raises:
    CheckpointError: a tensor is missing, misshapen or unknown; the message names it, the
      expected and the received shape.
  """
  tensors = {name.removeprefix("bert."): array for name, array in tensors.items()}
  table = bert_tensor_map(config)
  unknown = sorted(n for n in tensors if n not in table and not n.startswith(UNUSED_PREFIXES))
  if unknown:
    raise CheckpointError(
      f"{source} holds tensors a BERT encoder does not have: {unknown[:5]}; expected names such "
      "as `encoder.layer.0.attention.self.query.weight`. Is it a BERT checkpoint?"
    )
  params: dict = {}
  for name, (path, shape, transposed) in table.items():
    if name not in tensors:
      raise CheckpointError(
        f"tensor `{name}` is missing from {source}; expected shape {shape} for a BERT with "
        f"{config.num_layers} layers and hidden size {config.hidden_size}."
      )
    array = tensors[name]
    decoded = is_encoding(array)  # a QArray of a compressed-tensors checkpoint: our layout
    found = tuple(logical_shape(array)) if decoded else tuple(np.shape(array))
    if found != (shape[::-1] if decoded and transposed else shape):
      raise CheckpointError(
        f"tensor `{name}` in {source} has shape {found}; expected {shape} (param "
        f"`{'/'.join(path)}`). The file does not match the configured BERT sizes."
      )
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    if not decoded:
      array = np.ascontiguousarray(np.asarray(array).T if transposed else array, dtype=np.float32)
    node[path[-1]] = array
  return params


def to_hf_state(params: Any, config: BertConfig) -> dict[str, tuple[Any, bool]]:
  """`{HF tensor name: (our leaf, transposed)}`: the leaves as they are (float or compressed);
  `transposed` says the HF tensor is the leaf's transpose (every Linear kernel)."""
  by_path = {"/".join(path): (name, t) for name, (path, _, t) in bert_tensor_map(config).items()}
  state = {}
  for path, leaf in flatten(params).items():
    if path not in by_path:
      raise CheckpointError(
        f"param `{path}` has no Hugging Face BERT name; the tree does not fit a BERT of "
        f"{config.num_layers} layers. Export the encoder's own param tree."
      )
    name, transposed = by_path[path]
    state[name] = (leaf, transposed)
  return state
