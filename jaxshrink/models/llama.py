"""A Llama-family decoder in Flax NNX, with a KV-cache decode path (zoo presets: `llama_zoo`).

The layout is Llama's (Touvron et al., 2023), shared by Qwen2 and Mistral: RMSNorm before
attention and before the MLP, rotary position embeddings (Su et al., 2021) in Hugging Face's
half-rotation form, grouped-query attention (Ainslie et al., 2023: `num_kv_heads` key/value heads,
each shared by `num_heads // num_kv_heads` query heads) and a SwiGLU MLP (Shazeer, 2020). Layers are
separate numbered modules (not `nnx.scan`), and every weight matmul is an `nnx.Linear` with a
2-D `(in, out)` kernel, so calibration sees ordinary kernels grouped by layer. Param paths mirror
Hugging Face's `LlamaForCausalLM` names one to one (`jaxshrink.models.llama_hf`):

  model/embed_tokens/embedding                    (vocab, hidden)
  model/layers/3/self_attn/q_proj/kernel          (hidden, num_heads * head_dim)
  model/layers/3/self_attn/k_proj/kernel          (hidden, num_kv_heads * head_dim)
  model/layers/3/mlp/gate_proj/kernel             (hidden, intermediate)
  model/layers/3/input_layernorm/scale            (hidden,)
  model/norm/scale                                (hidden,)
  lm_head/kernel                                  (hidden, vocab)   absent when tied

`LlamaForCausalLM.decode` runs new tokens against a preallocated `KVCache`; `decode_functions`
turns it into a pure `decode(params, tokens, cache, position)` that `jaxshrink.generate` loops.

>>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
...                      num_heads=4, num_kv_heads=2)
>>> model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
>>> model(jnp.zeros((1, 5), jnp.int32)).shape
(1, 5, 64)
>>> logits, cache = model.decode(jnp.zeros((1, 1), jnp.int32), model.init_cache(1, 16), 5)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxshrink import kvcache
from jaxshrink.errors import InvalidValueError


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Sizes of a Llama-family decoder (Hugging Face `LlamaConfig` field meanings).

  Attributes:
    vocab_size: number of token ids.
    hidden_size: width of the residual stream.
    intermediate_size: width of the SwiGLU MLP.
    num_layers: decoder layers (`num_hidden_layers`).
    num_heads: query heads.
    num_kv_heads: key/value heads; must divide `num_heads` (equal: plain multi-head attention).
    head_dim: features per head; None means `hidden_size // num_heads`. Must be even (RoPE).
    max_positions: the longest sequence the model is meant for (`max_position_embeddings`);
      the default cache length of generation, not a hard limit of the rotary embedding.
    rope_theta: base of the rotary frequencies.
    rms_norm_eps: epsilon of every RMSNorm.
    tie_embeddings: the output projection is the token embedding (no `lm_head` param).
    attention_bias: q/k/v projections carry biases (Qwen2); o_proj never does.
    initializer_range: stddev of the normal initializer of every kernel and the embedding.
  """

  vocab_size: int = 32000
  hidden_size: int = 1024
  intermediate_size: int = 2816
  num_layers: int = 22
  num_heads: int = 16
  num_kv_heads: int = 4
  head_dim: int | None = None
  max_positions: int = 2048
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  attention_bias: bool = False
  initializer_range: float = 0.02

  def __post_init__(self):
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "max_positions"):  # fmt: skip
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidValueError(f"LlamaConfig `{field}` must be a positive int; got {value!r}.")
    if self.num_heads % self.num_kv_heads:
      raise InvalidValueError(
        f"LlamaConfig `num_kv_heads` ({self.num_kv_heads}) must divide `num_heads` "
        f"({self.num_heads}): each key/value head serves a whole group of query heads. Choose "
        "a divisor of `num_heads`."
      )
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise InvalidValueError(
        f"LlamaConfig `hidden_size` ({self.hidden_size}) must be divisible by `num_heads` "
        f"({self.num_heads}); choose a head count that divides it, or set `head_dim`."
      )
    if self.head_size % 2:
      raise InvalidValueError(
        f"LlamaConfig head size must be even for rotary embeddings; got {self.head_size}. "
        "Set `head_dim` (or `hidden_size // num_heads`) to an even number."
      )

  @property
  def head_size(self) -> int:
    """Features per head (`head_dim`, or `hidden_size // num_heads`)."""
    return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim


class KVCache(NamedTuple):
  """Keys and values of every position decoded so far, preallocated to `max_len` positions.

  Positions at or after the current one hold zeros (or stale values): the attention mask, not
  the contents, decides what is read.
  """

  # Per layer (B, max_len, num_kv_heads, head_dim) in the activation dtype, or a
  # `kvcache.QuantizedKV` (int8/int4 codes with per-token, per-head scales).
  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]  # per layer, the kind of `keys`


def init_cache(
  config: LlamaConfig,
  batch: int,
  max_len: int,
  dtype: Any = jnp.float32,
  kv_bits: int | None = None,
) -> KVCache:
  """An all-zero `KVCache` for `batch` sequences of up to `max_len` tokens; `kv_bits` 8 or 4
  stores keys and values quantized (`jaxshrink.kvcache`), None in `dtype`."""
  shape = (batch, max_len, config.num_kv_heads, config.head_size)
  if kvcache.check_bits(kv_bits) is not None:
    entries = [kvcache.empty(*shape, kv_bits) for _ in range(2 * config.num_layers)]
  else:
    entries = [jnp.zeros(shape, dtype) for _ in range(2 * config.num_layers)]
  return KVCache(tuple(entries[0::2]), tuple(entries[1::2]))


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding of `x` (B, T, heads, D) at integer `positions` (T,) (every row alike) or
  (B, T) (each row its own), HF's half rotation.

  Feature `i < D/2` pairs with `i + D/2` (not with its neighbour), which is what makes Hugging
  Face checkpoints load without permuting the q/k projections.
  """
  dim = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]  # (B?, T, 1, D)
  x32 = x.astype(jnp.float32)
  half = dim // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """`x / rms(x) * scale`, normalized in float32 and returned in the input's dtype."""

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


def _linear(config: LlamaConfig, n_in: int, n_out: int, rngs: nnx.Rngs, bias: bool = False):
  init = nnx.initializers.normal(config.initializer_range)
  return nnx.Linear(n_in, n_out, use_bias=bias, kernel_init=init, rngs=rngs)


class LlamaAttention(nnx.Module):
  """Grouped-query causal self-attention with rotary embeddings."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_size
    hidden, bias = config.hidden_size, config.attention_bias
    self.config = config
    self.q_proj = _linear(config, hidden, heads * head_dim, rngs, bias)
    self.k_proj = _linear(config, hidden, kv_heads * head_dim, rngs, bias)
    self.v_proj = _linear(config, hidden, kv_heads * head_dim, rngs, bias)
    self.o_proj = _linear(config, heads * head_dim, hidden, rngs)

  def __call__(
    self, x: jax.Array, positions: jax.Array, cache: tuple[jax.Array, jax.Array] | None = None
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """`x` (B, T, hidden) at `positions` (T,), or (B, T) with a cache (rows of a batch of
    prompts of different lengths decode at different positions); with `cache`, attends to it
    and returns it updated.

    Without a cache the T tokens attend to each other causally; with one, their keys and values
    are written at `positions` (consecutive) and each token attends to every cached position up
    to its own.
    """
    config = self.config
    batch, length, _ = x.shape
    kv_heads, head_dim = config.num_kv_heads, config.head_size
    group = config.num_heads // kv_heads
    q = self.q_proj(x).reshape(batch, length, config.num_heads, head_dim)
    k = self.k_proj(x).reshape(batch, length, kv_heads, head_dim)
    v = self.v_proj(x).reshape(batch, length, kv_heads, head_dim)
    q, k = rotary(q, positions, config.rope_theta), rotary(k, positions, config.rope_theta)
    if cache is None:
      keys, values, key_positions = k, v, positions
    else:
      start = positions[..., 0]  # () or (B,): where each row's tokens go
      if isinstance(cache[0], kvcache.QuantizedKV):
        keys = kvcache.write(cache[0], k, start)
        values = kvcache.write(cache[1], v, start)
      else:
        keys = kvcache.write_rows(cache[0], k.astype(cache[0].dtype), start)
        values = kvcache.write_rows(cache[1], v.astype(cache[1].dtype), start)
      cache = (keys, values)
    quantized = isinstance(keys, kvcache.QuantizedKV)
    if cache is not None:
      max_len = (keys.codes if quantized else keys).shape[1]
      key_positions = jnp.arange(max_len, dtype=positions.dtype)
    # Query head h reads key/value head h // group (HF's `repeat_kv` order).
    q = q.reshape(batch, length, kv_heads, group, head_dim) / jnp.asarray(
      math.sqrt(head_dim), q.dtype
    )
    if quantized:  # products with the codes, each key's scale applied after
      scores = kvcache.scores_with(q, keys).astype(q.dtype)
    else:
      scores = jnp.einsum("btkgd,bskd->bkgts", q, keys.astype(q.dtype))
    visible = key_positions <= positions[..., None]  # (T, S), or (B, T, S) per row
    if visible.ndim == 3:
      visible = visible[:, None, None]  # against scores (B, kv_heads, group, T, S)
    scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
    # Softmax in float32 even for bf16 activations: its exp/sum is what overflows first.
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype)
    if quantized:
      mixed = kvcache.mix_with(weights, values).astype(x.dtype)
    else:
      mixed = jnp.einsum("bkgts,bskd->btkgd", weights, values.astype(x.dtype))
    return self.o_proj(mixed.reshape(batch, length, config.num_heads * head_dim)), cache


class LlamaMLP(nnx.Module):
  """SwiGLU: `down(silu(gate(x)) * up(x))`."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    hidden, inner = config.hidden_size, config.intermediate_size
    self.gate_proj = _linear(config, hidden, inner, rngs)
    self.up_proj = _linear(config, hidden, inner, rngs)
    self.down_proj = _linear(config, inner, hidden, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.self_attn = LlamaAttention(config, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.mlp = LlamaMLP(config, rngs=rngs)

  def __call__(self, x, positions, cache=None):
    mixed, cache = self.self_attn(self.input_layernorm(x), positions, cache)
    x = x + mixed
    return x + self.mlp(self.post_attention_layernorm(x)), cache


class LlamaModel(nnx.Module):
  """Embedding, the numbered decoder layers and the final norm (HF's `model.` prefix)."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(config.initializer_range)
    self.embed_tokens = nnx.Embed(
      config.vocab_size, config.hidden_size, embedding_init=init, rngs=rngs
    )
    self.layers = nnx.List([LlamaDecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

  def __call__(self, tokens, positions, cache: KVCache | None = None):
    x = self.embed_tokens(tokens)
    keys, values = [], []
    for index, layer in enumerate(self.layers):
      layer_cache = None if cache is None else (cache.keys[index], cache.values[index])
      x, layer_cache = layer(x, positions, layer_cache)
      if layer_cache is not None:
        keys.append(layer_cache[0])
        values.append(layer_cache[1])
    return self.norm(x), None if cache is None else KVCache(tuple(keys), tuple(values))


class LlamaForCausalLM(nnx.Module):
  """Token ids (B, T) int -> next-token logits (B, T, vocab) in the params' dtype.

  `decode` and `init_cache` make it a KV-cache decoder for `jaxshrink.generate`.
  """

  def __init__(self, config: LlamaConfig | None = None, *, rngs: nnx.Rngs):
    config = LlamaConfig() if config is None else config
    self.config = config
    self.model = LlamaModel(config, rngs=rngs)
    if not config.tie_embeddings:
      self.lm_head = _linear(config, config.hidden_size, config.vocab_size, rngs)

  def _logits(self, hidden: jax.Array) -> jax.Array:
    if self.config.tie_embeddings:
      # Contract with the table as stored (no transpose op), so calibration and serving see
      # the embedding itself as the head's kernel.
      table = self.model.embed_tokens.embedding[...]
      return jnp.einsum("btd,vd->btv", hidden, table.astype(hidden.dtype))
    return self.lm_head(hidden)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    _check_tokens(tokens)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    hidden, _ = self.model(tokens, positions)
    return self._logits(hidden)

  def decode(
    self, tokens: jax.Array, cache: KVCache, position: jax.Array | int
  ) -> tuple[jax.Array, KVCache]:
    """Logits of `tokens` (B, T) placed at `position .. position+T-1` after the cached ones.

    Args:
      tokens: (B, T) int token ids (a prompt to prefill, or one new token per row).
      cache: the cache holding positions `0 .. position-1`.
      position: () int, where the first of `tokens` goes, or (B,) one per row; may be traced.

    Returns:
      `(logits (B, T, vocab), cache with these tokens' keys and values written)`.
    """
    _check_tokens(tokens)
    start = jnp.asarray(position, jnp.int32)
    positions = start[..., None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)  # (T,)/(B, T)
    hidden, cache = self.model(tokens, positions, cache)
    return self._logits(hidden), cache

  def init_cache(
    self, batch: int, max_len: int, dtype: Any = jnp.float32, kv_bits: int | None = None
  ) -> KVCache:
    """An empty cache for this model (see `init_cache`)."""
    return init_cache(self.config, batch, max_len, dtype, kv_bits)


def _check_tokens(tokens: jax.Array) -> None:
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise InvalidValueError(
      f"Llama `tokens` must be (batch, length) integer token ids; got shape {tokens.shape} and "
      f"dtype {tokens.dtype}."
    )


def decode_functions(
  module_ctor: Callable[..., nnx.Module],
) -> tuple[Callable[..., tuple[jax.Array, Any]], Callable[..., Any]]:
  """Pure `decode(params, tokens, cache, position)` and `init_cache(batch, max_len, dtype)`.

  Args:
    module_ctor: constructor of an NNX module with `decode` and `init_cache` methods (e.g.
      `functools.partial(LlamaForCausalLM, config)`), called as `module_ctor(rngs=...)`.

  Returns:
    `decode`, which rebuilds the module from `params` (a plain dict, as `nnx_functions`' `init`
    returns) on every call, so it jits and runs inside `lax.while_loop`; and `init_cache`.
  """
  abstract = nnx.eval_shape(lambda: module_ctor(rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)

  def decode(params, tokens, cache, position):
    state = jax.tree.map(lambda leaf: leaf, abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state).decode(tokens, cache, position)

  return decode, abstract.init_cache
