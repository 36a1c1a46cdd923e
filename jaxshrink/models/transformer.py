"""`tiny-lm`: a small causal decoder-only transformer over bytes (GPT-2 style, pre-LayerNorm).

Attention is written with plain `jnp` ops and every projection is an `nn.Dense` with a 2-D kernel
(`block_0/attention/query/kernel` is (d, num_heads * head_dim), by default (d, d)), so pruning and
quantization see ordinary matrices and a custom `dot_general` reaches every matmul that holds
weights. `head_dim` and per-block `layer_heads` let a head-pruned model be rebuilt with fewer
heads (`jaxshrink.sparsity.shrink_model`); their defaults give the original shapes.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxshrink.errors import InvalidValueError
from jaxshrink.models.base import ZooModel, linen_functions

TINY_LM_CONTEXT = 64
TINY_LM_VOCAB = 256


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention: (B, T, d) -> (B, T, d).

  Attributes:
    num_heads: attention heads.
    head_dim: features per head; None means `d // num_heads`. The query/key/value projections
      have `num_heads * head_dim` outputs and the output projection as many inputs, so a model
      that lost heads keeps its width d.
    dot_general: optional replacement for `lax.dot_general` in every Dense.
  """

  num_heads: int
  head_dim: int | None = None
  dot_general: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    if self.head_dim is None and width % self.num_heads:
      raise InvalidValueError(
        f"attention width {width} must be divisible by `num_heads`={self.num_heads}; "
        f"choose a width that is a multiple of the head count, or set `head_dim`."
      )
    head_dim = self.head_dim or width // self.num_heads
    features = self.num_heads * head_dim
    dense = functools.partial(nn.Dense, features, dot_general=self.dot_general)

    def heads(y: jax.Array) -> jax.Array:
      return y.reshape(batch, length, self.num_heads, head_dim)

    query = heads(dense(name="query")(x))
    key = heads(dense(name="key")(x))
    value = heads(dense(name="value")(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / jnp.asarray(math.sqrt(head_dim), x.dtype)
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    # Softmax in float32 even for bf16 activations: its exp/sum is what overflows first.
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(value.dtype)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, value).reshape(batch, length, features)
    return nn.Dense(width, dot_general=self.dot_general, name="out")(mixed)


class MLPBlock(nn.Module):
  """Position-wise feed-forward: Dense d -> 4d, GELU, Dense 4d -> d."""

  hidden: int
  dot_general: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = nn.gelu(nn.Dense(self.hidden, dot_general=self.dot_general, name="fc1")(x))
    return nn.Dense(width, dot_general=self.dot_general, name="fc2")(x)


class DecoderBlock(nn.Module):
  """Pre-LN residual block: x + attention(ln1(x)), then x + mlp(ln2(x))."""

  num_heads: int
  mlp_hidden: int
  head_dim: int | None = None
  dot_general: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    attention = CausalSelfAttention(
      self.num_heads, head_dim=self.head_dim, dot_general=self.dot_general, name="attention"
    )
    x = x + attention(nn.LayerNorm(name="ln1")(x))
    return x + MLPBlock(self.mlp_hidden, self.dot_general, name="mlp")(nn.LayerNorm(name="ln2")(x))


class TinyLM(nn.Module):
  """Byte-level causal language model: (B, T) int32 tokens -> (B, T, vocab) float32 logits.

  Attributes:
    width: model width d.
    depth: number of decoder blocks, named `block_0` .. `block_{depth-1}`.
    num_heads: attention heads per block.
    head_dim: features per head; None means `width // num_heads` (the trained tiny-lm).
    layer_heads: heads of each block, overriding `num_heads` (a head-pruned model), each of
      `head_dim` (default `width // num_heads`) features; None means `num_heads` everywhere.
    max_length: longest sequence (size of the learned position table).
    vocab_size: number of token ids (256 for bytes).
    dot_general: optional replacement for `lax.dot_general` in every Dense (quantization hook).
  """

  width: int = 160
  depth: int = 4
  num_heads: int = 4
  max_length: int = TINY_LM_CONTEXT
  vocab_size: int = TINY_LM_VOCAB
  dot_general: Any = None
  head_dim: int | None = None
  layer_heads: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    length = tokens.shape[-1]
    if length > self.max_length:
      raise InvalidValueError(
        f"`tokens` has length {length} but the model has {self.max_length} positions; pass "
        f"windows of at most {self.max_length} tokens."
      )
    heads = tuple(self.layer_heads or (self.num_heads,) * self.depth)
    if len(heads) != self.depth or min(heads) < 1:
      raise InvalidValueError(
        f"`layer_heads` must give a head count >= 1 for each of the {self.depth} blocks; got "
        f"{self.layer_heads}. Pass one entry per block, or None for `num_heads` everywhere."
      )
    # Heads keep the trained size when some are removed: their scores are scaled by sqrt(head_dim).
    head_dim = self.head_dim
    if head_dim is None and self.layer_heads is not None:
      head_dim = self.width // self.num_heads
    embed_init = nn.initializers.normal(stddev=0.02)
    x = nn.Embed(self.vocab_size, self.width, embedding_init=embed_init, name="embed")(tokens)
    positions = nn.Embed(self.max_length, self.width, embedding_init=embed_init, name="pos_embed")
    x = x + positions(jnp.arange(length, dtype=jnp.int32))[None]
    for index in range(self.depth):
      block = DecoderBlock(
        heads[index], 4 * self.width, head_dim, self.dot_general, name=f"block_{index}"
      )
      x = block(x)
    x = nn.LayerNorm(name="ln_final")(x)
    return nn.Dense(self.vocab_size, dot_general=self.dot_general, name="head")(x)


def tiny_lm() -> ZooModel:
  """The byte-level `tiny-lm` trained on `stdlib-text`."""
  module = TinyLM()
  input_shape = (TINY_LM_CONTEXT,)
  init, apply = linen_functions(module, input_shape, "int32")
  return ZooModel(
    name="tiny-lm",
    framework="linen",
    data="stdlib-text",
    metric="perplexity",
    init=init,
    apply=apply,
    # ~0.36 s/step on 2 CPU cores: ~4 minutes for 640 steps (~1.3M tokens, ~1.3 epochs), which
    # reaches a test perplexity of ~4.7 per byte; a d=128 model for 800 steps does about as well.
    train_steps=640,
    learning_rate=3e-3,
    batch_size=32,
    input_shape=input_shape,
    input_dtype="int32",
    weight_decay=0.01,
    warmup_steps=64,
    module=module,
    description="4-layer byte-level causal transformer, d=160, 4 heads (Linen)",
  )
