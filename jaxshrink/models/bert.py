"""A BERT sentence encoder in Flax NNX: embeddings, post-norm encoder layers, mean pooling.

The architecture is BERT's (Devlin et al., 2019) as used by sentence-transformers: token +
position + token-type embeddings, `num_layers` post-LayerNorm encoder layers (self-attention,
then a GELU feed-forward block), mean pooling over the non-padding tokens and L2
normalization. `BertConfig` sizes it, so the 6-layer MiniLM teacher and a 3-layer student come
from the same code; `head_dim`, per-layer `layer_heads` and per-layer `layer_intermediate`
describe a structurally pruned encoder (fewer heads and feed-forward channels per layer).

Every matmul with a weight is an `nnx.Linear` with a 2-D `(in, out)` kernel, including the
query/key/value/output projections of attention, so quantization, pruning and low-rank stages
treat them as ordinary Dense kernels. Param paths read like

  embeddings/word_embeddings/embedding        (vocab, hidden)
  encoder/layer_3/attention/query/kernel      (hidden, hidden)
  encoder/layer_3/attention/layer_norm/scale  (hidden,)
  encoder/layer_3/intermediate/kernel         (hidden, intermediate)
  encoder/layer_3/output/kernel               (intermediate, hidden)
  encoder/layer_3/output_norm/bias            (hidden,)

>>> model = BertEncoder(BertConfig(num_layers=1, hidden_size=8, num_heads=2,
...                                intermediate_size=16, vocab_size=20, max_positions=8),
...                     rngs=nnx.Rngs(0))
>>> model(jnp.array([[101, 5, 102, 0]], jnp.int32)).shape
(1, 8)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxshrink.errors import InvalidValueError

# Every float32 matmul at full precision: accelerators otherwise default to reduced-precision
# passes (TF32 / bf16), and the reference match is checked to a cosine of 1e-4.
PRECISION = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes of a BERT encoder (defaults: all-MiniLM-L6-v2).

  Attributes:
    num_layers: encoder layers.
    hidden_size: width of the residual stream; also the embedding size.
    num_heads: attention heads; must divide `hidden_size`.
    intermediate_size: width of the feed-forward block.
    vocab_size: number of token ids.
    max_positions: longest sequence the position table covers.
    type_vocab_size: number of token types (segments); inputs always use type 0.
    layer_norm_eps: epsilon of every LayerNorm.
    pad_id: the padding token id; positions holding it are masked out of attention and
      pooling (it must never occur as a real token).
    head_dim: features per attention head; None means `hidden_size // num_heads`.
    layer_heads: heads of each layer, overriding `num_heads` (a head-pruned encoder rebuilt by
      `jaxshrink.sparsity.shrink_model`); None means `num_heads` in every layer.
    layer_intermediate: feed-forward width of each layer, overriding `intermediate_size` (an
      encoder whose channels were pruned by `jaxshrink.sparsity.minitron`); None means
      `intermediate_size` in every layer.
  """

  num_layers: int = 6
  hidden_size: int = 384
  num_heads: int = 12
  intermediate_size: int = 1536
  vocab_size: int = 30522
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_id: int = 0
  head_dim: int | None = None
  layer_heads: tuple[int, ...] | None = None
  layer_intermediate: tuple[int, ...] | None = None

  def __post_init__(self):
    for field in ("num_layers", "hidden_size", "num_heads", "intermediate_size", "vocab_size",
                  "max_positions", "type_vocab_size"):  # fmt: skip
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidValueError(f"BertConfig `{field}` must be a positive int; got {value!r}.")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise InvalidValueError(
        f"BertConfig `hidden_size` ({self.hidden_size}) must be divisible by `num_heads` "
        f"({self.num_heads}); choose a head count that divides it, or set `head_dim`."
      )
    if self.head_dim is not None and (isinstance(self.head_dim, bool) or self.head_dim < 1):
      raise InvalidValueError(
        f"BertConfig `head_dim` must be None or a positive int; got {self.head_dim!r}."
      )
    heads = self.layer_heads
    if heads is not None and (len(heads) != self.num_layers or min(heads) < 1):
      raise InvalidValueError(
        f"BertConfig `layer_heads` must give a head count >= 1 for each of the "
        f"{self.num_layers} layers; got {heads}. Pass one entry per layer, or None."
      )
    widths = self.layer_intermediate
    if widths is not None and (len(widths) != self.num_layers or min(widths) < 1):
      raise InvalidValueError(
        f"BertConfig `layer_intermediate` must give a feed-forward width >= 1 for each of the "
        f"{self.num_layers} layers; got {widths}. Pass one entry per layer, or None."
      )

  @property
  def head_size(self) -> int:
    """Features per attention head (`head_dim`, or `hidden_size // num_heads`)."""
    return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

  def heads(self, layer: int) -> int:
    """Attention heads of encoder layer `layer`."""
    return self.num_heads if self.layer_heads is None else self.layer_heads[layer]

  def intermediate(self, layer: int) -> int:
    """Feed-forward width of encoder layer `layer`."""
    if self.layer_intermediate is None:
      return self.intermediate_size
    return self.layer_intermediate[layer]


def _linear(n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(n_in, n_out, precision=PRECISION, rngs=rngs)


def _layer_norm(config: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance: E[x^2] - E[x]^2 loses digits on the wide residual stream.
  return nnx.LayerNorm(
    config.hidden_size, epsilon=config.layer_norm_eps, use_fast_variance=False, rngs=rngs
  )


class BertEmbeddings(nnx.Module):
  """Token + position + token-type embeddings, then LayerNorm."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.word_embeddings = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
    self.position_embeddings = nnx.Embed(config.max_positions, config.hidden_size, rngs=rngs)
    self.token_type_embeddings = nnx.Embed(config.type_vocab_size, config.hidden_size, rngs=rngs)
    self.layer_norm = _layer_norm(config, rngs)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    length = input_ids.shape[1]
    x = self.word_embeddings(input_ids)
    x = x + self.position_embeddings(jnp.arange(length, dtype=jnp.int32))[None]
    # Single-segment inputs: every token has type 0.
    x = x + self.token_type_embeddings(jnp.zeros((1, length), jnp.int32))
    return self.layer_norm(x)


class BertAttention(nnx.Module):
  """Multi-head self-attention with its output projection, residual and LayerNorm."""

  def __init__(self, config: BertConfig, num_heads: int, *, rngs: nnx.Rngs):
    self.num_heads, self.head_dim = num_heads, config.head_size
    hidden, inner = config.hidden_size, num_heads * config.head_size
    self.query = _linear(hidden, inner, rngs)
    self.key = _linear(hidden, inner, rngs)
    self.value = _linear(hidden, inner, rngs)
    self.output = _linear(inner, hidden, rngs)
    self.layer_norm = _layer_norm(config, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    batch, length, _ = x.shape
    heads, head_dim = self.num_heads, self.head_dim

    def split(t):
      return t.reshape(batch, length, heads, head_dim)

    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=PRECISION) / math.sqrt(head_dim)
    # A large finite negative (not -inf): an all-padding row then gets uniform weights instead
    # of NaN, and is dropped by the pooling mask anyway.
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    context = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=PRECISION)
    context = context.reshape(batch, length, heads * head_dim)
    return self.layer_norm(x + self.output(context))


class BertLayer(nnx.Module):
  """One post-norm encoder layer: attention block, then the GELU feed-forward block."""

  def __init__(
    self, config: BertConfig, num_heads: int, intermediate: int | None = None, *, rngs: nnx.Rngs
  ):
    intermediate = config.intermediate_size if intermediate is None else intermediate
    self.attention = BertAttention(config, num_heads, rngs=rngs)
    self.intermediate = _linear(config.hidden_size, intermediate, rngs)
    self.output = _linear(intermediate, config.hidden_size, rngs)
    self.output_norm = _layer_norm(config, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.attention(x, mask)
    # BERT's "gelu" is the exact erf form, not the tanh approximation.
    h = jax.nn.gelu(self.intermediate(x), approximate=False)
    return self.output_norm(x + self.output(h))


class BertLayers(nnx.Module):
  """The stack of encoder layers, as attributes `layer_0 ... layer_{n-1}` (readable paths)."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.num_layers = config.num_layers
    for index in range(config.num_layers):
      layer = BertLayer(config, config.heads(index), config.intermediate(index), rngs=rngs)
      setattr(self, f"layer_{index}", layer)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    for index in range(self.num_layers):
      x = getattr(self, f"layer_{index}")(x, mask)
    return x


class BertEncoder(nnx.Module):
  """Token ids (B, L) int32 -> mean-pooled, L2-normalized sentence embeddings (B, hidden).

  The attention and pooling mask is `input_ids != config.pad_id`. An all-padding row (as used
  to pad a batch) gives a zero embedding, never NaN.
  """

  def __init__(self, config: BertConfig | None = None, *, rngs: nnx.Rngs):
    config = BertConfig() if config is None else config
    self.pad_id = config.pad_id
    self.embeddings = BertEmbeddings(config, rngs=rngs)
    self.encoder = BertLayers(config, rngs=rngs)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise InvalidValueError(
        f"BERT `input_ids` must be (batch, length) integer token ids; got shape "
        f"{input_ids.shape} and dtype {input_ids.dtype}. Tokenize with "
        "`jaxshrink.models.minilm.encode`."
      )
    mask = input_ids != self.pad_id
    hidden = self.encoder(self.embeddings(input_ids), mask)
    return mean_pool_normalize(hidden, mask)


def mean_pool_normalize(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over the masked-in tokens, then L2 normalization (sentence-transformers' pooling).

  Args:
    hidden: (B, L, D) float token states.
    mask: (B, L) bool, True for real tokens.

  Returns:
    (B, D) embeddings of unit norm (zero for a row with no real token).

  >>> mean_pool_normalize(jnp.ones((1, 3, 4)), jnp.array([[True, True, False]])).tolist()
  [[0.5, 0.5, 0.5, 0.5]]
  """
  weights = mask.astype(hidden.dtype)[..., None]
  summed = jnp.sum(hidden * weights, axis=1)
  pooled = summed / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)
