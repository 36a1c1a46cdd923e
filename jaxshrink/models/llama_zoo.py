"""The Llama presets of the zoo: `llama-tiny` (trained on first use) and `llama-300m` (random).

`llama-tiny` trains like `tiny-lm`, on first use, on the `corpus-bpe` windows, and is cached by
`models.pretrained`. `llama-300m` is for speed and memory runs only: its `weights` are random
but deterministic (seed `LLAMA_300M_SEED`), so `pretrained` loads them and never trains. They are
drawn leaf by leaf, each by its own small jitted program, so building them needs the weights'
memory plus one leaf's temporaries, not the several copies one program for the whole tree holds.

>>> get_model("llama-300m").weights()["model"]["norm"]["scale"].shape  # doctest: +SKIP
(1024,)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxshrink.models.base import ZooModel, zoo_model
from jaxshrink.models.llama import LlamaConfig, LlamaForCausalLM
from jaxshrink.tree import path_string

# Kept equal to `jaxshrink.data.bpe_text` (a test pins it): the model does not import its data.
LLAMA_TINY_CONTEXT = 128
LLAMA_TINY_VOCAB = 4096
LLAMA_300M_SEED = 0

# ~10.2M params (vocab 4096, 6 layers of width 320, 10 query and 2 key/value heads of 32).
LLAMA_TINY = LlamaConfig(
  vocab_size=LLAMA_TINY_VOCAB, hidden_size=320, intermediate_size=1056, num_layers=6, num_heads=10,
  num_kv_heads=2, max_positions=LLAMA_TINY_CONTEXT,
)  # fmt: skip
# ~314M params in a Qwen2.5-0.5B-like shape (untied head, 4 query heads per key/value head).
LLAMA_300M = LlamaConfig(
  vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=22, num_heads=16,
  num_kv_heads=4, max_positions=2048,
)  # fmt: skip


def llama_tiny() -> ZooModel:
  """`llama-tiny`: a small Llama trained on first use on the BPE-tokenized English corpus."""
  return zoo_model(
    "llama-tiny",
    functools.partial(LlamaForCausalLM, LLAMA_TINY),
    (LLAMA_TINY_CONTEXT,),
    "int32",
    "6-layer Llama (RMSNorm, RoPE, GQA 10/2, SwiGLU), d=320, BPE 4096 (NNX)",
    data="corpus-bpe",
    metric="perplexity",
    # 1.7 s/step on 2 idle CPU cores: 408 s for 280 steps of 16 x 128 tokens (~0.9 epoch of
    # the training tokens), test perplexity about 320 per BPE token (`interop` benchmark).
    train_steps=280,
    learning_rate=3e-3,
    batch_size=16,
    weight_decay=0.1,
    warmup_steps=28,
  )


@functools.partial(jax.jit, static_argnames=("shape", "std"))
def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
  return std * jax.random.normal(key, shape, jnp.float32)


def random_weights(model: ZooModel, config: LlamaConfig, seed: int) -> dict:
  """Seeded random params shaped like `model.init`'s: normal(0, `initializer_range`) kernels and
  embeddings, unit norm scales, zero biases; leaf `i` is drawn with `fold_in(key(seed), i)`."""
  shapes = jax.eval_shape(model.init, jax.random.key(seed))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  key = jax.random.key(seed)
  drawn = []
  for index, (path, leaf) in enumerate(leaves):
    name = path_string(path)
    if name.endswith("/scale"):
      drawn.append(jnp.ones(leaf.shape, leaf.dtype))
    elif name.endswith("/bias"):
      drawn.append(jnp.zeros(leaf.shape, leaf.dtype))
    else:
      std = config.initializer_range
      drawn.append(_normal(jax.random.fold_in(key, index), tuple(leaf.shape), std))
  return jax.tree.unflatten(treedef, drawn)


def llama_300m() -> ZooModel:
  """`llama-300m`: deterministic random weights for speed and memory runs; never trained."""
  model = zoo_model(
    "llama-300m",
    functools.partial(LlamaForCausalLM, LLAMA_300M),
    (LLAMA_TINY_CONTEXT,),
    "int32",
    "22-layer Llama, d=1024, GQA 16/4, vocab 32000, random weights (speed/memory only)",
    data="corpus-bpe",
    metric="perplexity",
    train_steps=1,
    learning_rate=1e-4,
    batch_size=8,
  )
  weights = functools.partial(random_weights, model, LLAMA_300M, LLAMA_300M_SEED)
  return dataclasses.replace(model, weights=weights)
