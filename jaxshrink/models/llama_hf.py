"""The one name map between `LlamaForCausalLM` param paths and Hugging Face Llama names.

Our paths mirror Hugging Face's module names with `/` for `.`; the leaf names differ (`kernel`,
`scale` and `embedding` are all HF's `weight`), and Flax stores a Linear kernel `(in, out)`
where PyTorch stores `weight` `(out, in)`, so kernels are transposed on the way across. Import
and export of Llama-family checkpoints (float or compressed) build on `LLAMA_NAME_TABLE`.

>>> to_hf_name("model/layers/3/self_attn/q_proj/kernel")
('model.layers.3.self_attn.q_proj.weight', True)
>>> from_hf_name("model.layers.3.input_layernorm.weight")
('model/layers/3/input_layernorm/scale', False)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from jaxshrink.encoding import is_encoding
from jaxshrink.errors import InvalidValueError
from jaxshrink.tree import flatten

_LAYER = "model/layers/{i}"
_HF_LAYER = "model.layers.{i}"
_PROJECTIONS = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
                "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")  # fmt: skip


def _hf(path: str) -> str:
  return path.replace("/", ".")


# (our path, HF name, transposed); `{i}` stands for the layer index in both.
LLAMA_NAME_TABLE: tuple[tuple[str, str, bool], ...] = (
  ("model/embed_tokens/embedding", "model.embed_tokens.weight", False),
  *((f"{_LAYER}/{p}/kernel", f"{_HF_LAYER}.{_hf(p)}.weight", True) for p in _PROJECTIONS),
  # Biases of q/k/v exist only with `attention_bias` (Qwen2).
  *((f"{_LAYER}/{p}/bias", f"{_HF_LAYER}.{_hf(p)}.bias", False) for p in _PROJECTIONS[:3]),
  (f"{_LAYER}/input_layernorm/scale", f"{_HF_LAYER}.input_layernorm.weight", False),
  (
    f"{_LAYER}/post_attention_layernorm/scale",
    f"{_HF_LAYER}.post_attention_layernorm.weight",
    False,
  ),  # fmt: skip
  ("model/norm/scale", "model.norm.weight", False),
  ("lm_head/kernel", "lm_head.weight", True),
)
# Buffers some HF checkpoints carry that are not parameters (recomputed from the config).
HF_BUFFERS = re.compile(r".*\.rotary_emb\.inv_freq")


def _pattern(template: str) -> re.Pattern:
  return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_OURS = [(_pattern(ours), hf, t) for ours, hf, t in LLAMA_NAME_TABLE]
_THEIRS = [(_pattern(hf), ours, t) for ours, hf, t in LLAMA_NAME_TABLE]


def _lookup(name: str, table, what: str) -> tuple[str, bool]:
  for pattern, target, transposed in table:
    match = pattern.fullmatch(name)
    if match:
      return target.replace("{i}", match.groupdict().get("i") or ""), transposed
  raise InvalidValueError(
    f"{what} `{name}` is not in the Llama name table; known forms: "
    f"{', '.join(row[0 if what.startswith('param') else 1] for row in LLAMA_NAME_TABLE)}."
  )


def to_hf_name(path: str) -> tuple[str, bool]:
  """`(Hugging Face name, transposed)` of one of our param paths.

  Raises:
    InvalidValueError: a path outside the table (not a Llama param).
  """
  return _lookup(path, _OURS, "param path")


def from_hf_name(name: str) -> tuple[str, bool]:
  """`(our param path, transposed)` of a Hugging Face Llama parameter name.

  Raises:
    InvalidValueError: a name outside the table (not a Llama parameter).
  """
  return _lookup(name, _THEIRS, "Hugging Face name")


def to_hf_state(params: Any) -> dict[str, Any]:
  """Our param tree as `{HF name: array}`, kernels transposed to PyTorch's `(out, in)`.

  The arrays keep their type and dtype (transposed views for NumPy inputs).
  """
  state = {}
  for path, leaf in flatten(params).items():
    name, transposed = to_hf_name(path)
    state[name] = leaf.T if transposed else leaf
  return state


def from_hf_state(state: Mapping[str, Any]) -> dict:
  """`{HF name: array}` as our nested param dict (layer indices as int keys, like nnx lists).

  Rotary `inv_freq` buffers are skipped; any other unknown name raises `InvalidValueError`.
  """
  params: dict = {}
  for name, array in state.items():
    if HF_BUFFERS.fullmatch(name):
      continue
    path, transposed = from_hf_name(name)
    node = params
    keys = [int(k) if k.isdigit() else k for k in path.split("/")]
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    # A decoded leaf (a QArray from a compressed-tensors checkpoint) is already in our layout.
    node[keys[-1]] = array.T if transposed and not is_encoding(array) else array
  return params
