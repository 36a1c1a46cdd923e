"""Model configs across: our `LlamaConfig` / `BertConfig` and Hugging Face's `config.json`.

Reading a config refuses every field value our models would not compute the same way (an
activation, rotary scaling, sliding-window attention, biases Llama puts on `o_proj`), naming the
field and its value: such a checkpoint would load and silently compute something else.

>>> llama_to_hf(LlamaConfig(num_heads=16, num_kv_heads=4))["num_key_value_heads"]
4
"""

from __future__ import annotations

from typing import Any

from jaxshrink.errors import CheckpointError, UsageError
from jaxshrink.models.bert import BertConfig
from jaxshrink.models.llama import LlamaConfig

LLAMA_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "mistral": "MistralForCausalLM"}  # fmt: skip


def llama_to_hf(c: LlamaConfig) -> dict[str, Any]:
  """The Hugging Face config fields of a Llama decoder (Qwen2's when it has q/k/v biases)."""
  head_dim = c.head_dim or c.hidden_size // c.num_heads
  model_type = "qwen2" if c.attention_bias else "llama"  # Qwen2: q/k/v biases, none on o_proj
  config = {
    "architectures": [LLAMA_TYPES[model_type]], "model_type": model_type,
    "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
    "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
    "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
    "head_dim": head_dim, "max_position_embeddings": c.max_positions,
    "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": c.tie_embeddings,
    "hidden_act": "silu", "initializer_range": c.initializer_range,
    # transformers 4 reads `rope_theta`, 5 reads `rope_parameters`; both are written.
    "rope_theta": c.rope_theta,
    "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
  }  # fmt: skip
  if model_type == "llama":
    config.update(attention_bias=False, mlp_bias=False)
  else:
    config.update(use_sliding_window=False, max_window_layers=c.num_layers)
  return config


def bert_to_hf(c: BertConfig) -> dict[str, Any]:
  """The Hugging Face `BertModel` config fields of a BERT encoder.

  Raises:
    UsageError: per-layer sizes or a head size that BertConfig cannot express.
  """
  if c.layer_heads is not None or c.layer_intermediate is not None:
    raise UsageError(
      "this BERT encoder has per-layer head counts or feed-forward widths (a structurally "
      "shrunk model), which Hugging Face's BertConfig cannot express; export it with "
      "`--to safetensors`, or export the model before structured pruning."
    )
  if c.head_dim is not None and c.head_dim * c.num_heads != c.hidden_size:
    raise UsageError(
      f"this BERT encoder has head_dim {c.head_dim} x {c.num_heads} heads != hidden size "
      f"{c.hidden_size}, which Hugging Face's BertConfig cannot express; export it with "
      "`--to safetensors`."
    )
  return {
    "architectures": ["BertModel"], "model_type": "bert", "vocab_size": c.vocab_size,
    "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers,
    "num_attention_heads": c.num_heads, "intermediate_size": c.intermediate_size,
    "max_position_embeddings": c.max_positions, "type_vocab_size": c.type_vocab_size,
    "layer_norm_eps": c.layer_norm_eps, "pad_token_id": c.pad_id, "hidden_act": "gelu",
    "position_embedding_type": "absolute",
  }  # fmt: skip


def _field(config: dict, key: str, kind: type, where: str, default: Any = None) -> Any:
  value = config.get(key, default)
  ok = isinstance(value, kind) and not isinstance(value, bool) if kind is not bool else (
    isinstance(value, bool)
  )  # fmt: skip
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    value, ok = float(value), True
  if not ok:
    raise CheckpointError(
      f"`{where}`: field `{key}` is {value!r}; expected a {kind.__name__}. Is it a config.json "
      "that transformers wrote?"
    )
  return value


def _require(config: dict, key: str, allowed: tuple, where: str, default: Any = None) -> None:
  value = config.get(key, default)
  if value not in allowed:
    raise CheckpointError(
      f"`{where}`: field `{key}` is {value!r}; jaxshrink's model computes only {list(allowed)}, "
      "so this checkpoint would load but compute something else. Nothing was loaded."
    )


def llama_from_config(config: dict, where: str) -> LlamaConfig:
  """`LlamaConfig` of a Llama / Qwen2 / Mistral `config.json`, refusing what we cannot compute."""
  model_type = config.get("model_type")
  _require(config, "hidden_act", ("silu",), where, "silu")
  _require(config, "mlp_bias", (False,), where, False)
  rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
  if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
    raise CheckpointError(
      f"`{where}`: rotary scaling {rope!r} is not supported (plain RoPE only); nothing was loaded."
    )
  if model_type == "llama":
    _require(config, "attention_bias", (False,), where, False)  # Llama's bias includes o_proj
  heads = _field(config, "num_attention_heads", int, where)
  if model_type == "mistral" and config.get("sliding_window") is not None:
    if config["sliding_window"] < _field(config, "max_position_embeddings", int, where):
      raise CheckpointError(
        f"`{where}`: sliding-window attention ({config['sliding_window']}) is not supported; "
        "nothing was loaded."
      )
  if model_type == "qwen2" and config.get("use_sliding_window"):
    raise CheckpointError(f"`{where}`: Qwen2 sliding-window attention is not supported.")
  return LlamaConfig(
    vocab_size=_field(config, "vocab_size", int, where),
    hidden_size=_field(config, "hidden_size", int, where),
    intermediate_size=_field(config, "intermediate_size", int, where),
    num_layers=_field(config, "num_hidden_layers", int, where),
    num_heads=heads,
    num_kv_heads=_field(config, "num_key_value_heads", int, where, heads),
    head_dim=None if config.get("head_dim") is None else _field(config, "head_dim", int, where),
    max_positions=_field(config, "max_position_embeddings", int, where, 2048),
    rope_theta=_field(rope, "rope_theta", float, where, config.get("rope_theta", 10000.0)),
    rms_norm_eps=_field(config, "rms_norm_eps", float, where, 1e-6),
    tie_embeddings=_field(config, "tie_word_embeddings", bool, where, False),
    attention_bias=model_type == "qwen2",
  )


def bert_from_config(config: dict, where: str) -> BertConfig:
  """`BertConfig` of a BERT `config.json`, refusing what the encoder cannot compute."""
  _require(config, "hidden_act", ("gelu",), where, "gelu")
  _require(config, "position_embedding_type", ("absolute",), where, "absolute")
  return BertConfig(
    num_layers=_field(config, "num_hidden_layers", int, where),
    hidden_size=_field(config, "hidden_size", int, where),
    num_heads=_field(config, "num_attention_heads", int, where),
    intermediate_size=_field(config, "intermediate_size", int, where),
    vocab_size=_field(config, "vocab_size", int, where),
    max_positions=_field(config, "max_position_embeddings", int, where, 512),
    type_vocab_size=_field(config, "type_vocab_size", int, where, 2),
    layer_norm_eps=_field(config, "layer_norm_eps", float, where, 1e-12),
    pad_id=_field(config, "pad_token_id", int, where, 0),
  )
