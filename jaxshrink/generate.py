"""Autoregressive generation: one jitted program, a prefill then a `lax.while_loop` of decodes.

A zoo decoder with a KV cache (`llama-tiny`, `llama-300m`, any NNX module with `decode` and
`init_cache`, see `jaxshrink.models.llama`) prefills the prompt into a cache preallocated to
`max_len` positions and then decodes one token per iteration against it. Any other causal
language model, `apply(params, tokens (B, T)) -> logits (B, T, vocab)` (e.g. `tiny-lm`), runs
without a cache: every iteration recomputes the whole `(B, max_len)` buffer, whose positions
after the current one the causal mask keeps from mattering.

The params may be a compressed tree. By default its encodings are decoded inside the jitted
program, once per call, before the loop (`materialize`), so generation is exactly the float
computation of the decoded weights. `serving=` runs a serving mode of `jaxshrink.serving`
instead: `"integer"` replays the whole program, loop included, with W8A8 kernels on the int8
path; `"bfloat16"` and `"factored"` likewise; `"decode-once"` decodes the tree once, up front.

>>> out = generate(get_model("llama-tiny"), params, prompt, 20)      # greedy
>>> out.tokens.shape, out.lengths.shape
((1, 20), (1,))
>>> out = generate(model, ctree, prompt, 20, temperature=0.8, top_k=40, key=jax.random.key(0))

Prompts of different lengths go in one batch right-padded, with `prompt_lengths`: each row
reads its next-token logits at its own last prompt token and writes every new token at its own
position, so a row's padding is overwritten before the causal mask would ever let it be read.

>>> out = generate(model, params, padded, 20, prompt_lengths=[5, 12])   # padded (2, 12)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxshrink.encoding import materialize
from jaxshrink.errors import InvalidTypeError, InvalidValueError, UsageError
from jaxshrink.models.base import ZooModel

_NOT_A_DECODER = (
  "`generate` needs a causal language model: a zoo decoder (`llama-tiny`, `tiny-lm`) or an "
  "`apply(params, tokens (B, T) int32) -> logits (B, T, vocab)`"
)


class Generation(NamedTuple):
  """What `generate` returns.

  Attributes:
    tokens: (B, max_new_tokens) int32 new token ids; after a row's `eos_id`, `eos_id` again.
    lengths: (B,) int32 tokens generated per row, its `eos_id` included (`max_new_tokens`
      for a row that never produced it).
  """

  tokens: jax.Array
  lengths: jax.Array


class _Decoder(NamedTuple):
  """`prefill(params, prompt, max_len, lengths) -> (logits (B, V), state)` and
  `step(params, state, token (B,), position) -> (logits (B, V), state)`, where `position` is
  where `token` goes: () for every row, or (B,) per row when `lengths` (B,) gives each prompt's
  length (None: every row is a whole prompt)."""

  prefill: Callable[..., tuple[jax.Array, Any]]
  step: Callable[..., tuple[jax.Array, Any]]


def _float_dtype(params: Any) -> Any:
  """The activation dtype of a float (or decoded) tree: its float leaves' promoted dtype."""
  dtypes = [
    leaf.dtype for leaf in jax.tree.leaves(params) if jnp.issubdtype(leaf.dtype, jnp.floating)
  ]
  return functools.reduce(jnp.promote_types, dtypes) if dtypes else jnp.float32


@functools.cache
def _kv_decoder(module_ctor: Any, kv_bits: int | None = None) -> _Decoder:
  from jaxshrink.models.llama import decode_functions

  decode, init_cache = decode_functions(module_ctor)

  def prefill(params, prompt, max_len, lengths):
    cache = init_cache(prompt.shape[0], max_len, _float_dtype(params), kv_bits)
    logits, cache = decode(params, prompt, cache, 0)
    return _last(logits, lengths), cache

  def step(params, cache, token, position):
    logits, cache = decode(params, token[:, None], cache, position)
    return logits[:, 0], cache

  return _Decoder(prefill, step)


@functools.cache
def _recompute_decoder(apply: Callable[..., Any]) -> _Decoder:
  def logits_at(params, buffer, position):
    """Logits at `position`: () for every row, or (B,) one per row."""
    logits = apply(params, buffer)
    if logits.ndim != 3 or logits.shape[:2] != buffer.shape:
      raise UsageError(
        f"{_NOT_A_DECODER}; for tokens of shape {buffer.shape} this apply returns "
        f"{logits.shape}. Pass a language model's apply (or its ZooModel)."
      )
    if jnp.ndim(position) == 1:
      return jnp.take_along_axis(logits, position[:, None, None], axis=1)[:, 0]
    return lax.dynamic_index_in_dim(logits, position, axis=1, keepdims=False)

  def prefill(params, prompt, max_len, lengths):
    batch, length = prompt.shape
    buffer = jnp.zeros((batch, max_len), jnp.int32).at[:, :length].set(prompt.astype(jnp.int32))
    return logits_at(params, buffer, length - 1 if lengths is None else lengths - 1), buffer

  def step(params, buffer, token, position):
    if jnp.ndim(position) == 1:
      buffer = buffer.at[jnp.arange(buffer.shape[0]), position].set(token)
    else:
      buffer = lax.dynamic_update_slice(buffer, token[:, None], (0, position))
    return logits_at(params, buffer, position), buffer

  return _Decoder(prefill, step)


def _decoder(apply_or_model: Any, kv_bits: int | None = None) -> _Decoder:
  from jaxshrink.kvcache import check_bits

  if check_bits(kv_bits) is not None and not _has_cache(apply_or_model):
    raise UsageError(
      f"`kv_bits`={kv_bits} quantizes a KV cache, and this model decodes without one (each "
      "token recomputes the whole buffer). Use a KV-cache decoder (`llama-tiny`, `llama-300m`) "
      "or leave `kv_bits` out."
    )
  if isinstance(apply_or_model, ZooModel):
    model = apply_or_model
    if model.metric != "perplexity":
      raise UsageError(
        f"{_NOT_A_DECODER}; model {model.name!r} is scored by {model.metric!r}, so it is not one."
      )
    if _has_cache(model):
      return _kv_decoder(model.module, kv_bits)
    return _recompute_decoder(model.apply)
  if callable(apply_or_model):
    return _recompute_decoder(apply_or_model)
  raise InvalidTypeError(
    f"`apply_or_model` must be a ZooModel or an apply function; got "
    f"{type(apply_or_model).__name__}. {_NOT_A_DECODER}."
  )


def _last(logits: jax.Array, lengths: jax.Array | None) -> jax.Array:
  """(B, T, V) prompt logits -> (B, V) at each row's last prompt token."""
  if lengths is None:
    return logits[:, -1]
  return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]


def _has_cache(apply_or_model: Any) -> bool:
  if not isinstance(apply_or_model, ZooModel) or apply_or_model.framework != "nnx":
    return False
  ctor = apply_or_model.module
  cls = ctor.func if isinstance(ctor, functools.partial) else ctor
  return all(hasattr(cls, m) for m in ("decode", "init_cache"))


def _sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None):
  """(B, V) logits -> (B,) int32 ids: argmax at temperature 0, else a top-k categorical draw."""
  logits = logits.astype(jnp.float32)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    if top_k > logits.shape[-1]:
      raise InvalidValueError(
        f"`top_k`={top_k} exceeds the vocabulary of {logits.shape[-1]} tokens; pass at most "
        f"{logits.shape[-1]} (or None to sample from all)."
      )
    kth = lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _program(decoder: _Decoder, steps: int, max_len: int, temperature, top_k, eos_id):
  """`run(params, prompt, key) -> Generation` on a dense tree: prefill, then the loop."""
  fill = 0 if eos_id is None else eos_id

  def run(params, prompt, lengths, key):
    batch, length = prompt.shape
    if lengths is not None:
      length = lengths  # (B,): each row continues after its own prompt
    logits, state = decoder.prefill(params, prompt, max_len, lengths)
    first = _sample(logits, jax.random.fold_in(key, 0), temperature, top_k)
    tokens = jnp.full((batch, steps), fill, jnp.int32).at[:, 0].set(first)
    done = jnp.zeros((batch,), bool) if eos_id is None else first == eos_id

    def cond(carry):
      i, _, _, _, done = carry
      return (i < steps) & ~jnp.all(done)

    def body(carry):
      i, last, state, tokens, done = carry
      logits, state = decoder.step(params, state, last, length + i - 1)
      token = _sample(logits, jax.random.fold_in(key, i), temperature, top_k)
      token = jnp.where(done, fill, token)
      tokens = lax.dynamic_update_slice(tokens, token[:, None], (0, i))
      if eos_id is not None:
        done = done | (token == eos_id)
      return i + 1, token, state, tokens, done

    carry = (jnp.int32(1), first, state, tokens, done)
    tokens = lax.while_loop(cond, body, carry)[3]
    if eos_id is None:
      return Generation(tokens, jnp.full((batch,), steps, jnp.int32))
    hit = tokens == eos_id
    lengths = jnp.where(jnp.any(hit, axis=1), jnp.argmax(hit, axis=1) + 1, steps)
    return Generation(tokens, lengths.astype(jnp.int32))

  return run


@functools.lru_cache(maxsize=64)
def _compiled(decoder: _Decoder, steps, max_len, temperature, top_k, eos_id, serving):
  run = _program(decoder, steps, max_len, temperature, top_k, eos_id)
  if serving is None:
    return jax.jit(lambda tree, *args: run(materialize(tree), *args))
  if serving == "integer":
    from jaxshrink.quant.serve import quantized_apply

    return jax.jit(quantized_apply(run))
  if serving == "bfloat16":
    from jaxshrink.serving import bfloat16_apply

    return jax.jit(bfloat16_apply(run))
  if serving == "factored":
    from jaxshrink.lowrank import lowrank_apply

    # `lowrank_apply` passes one input after the tree: the other arguments travel as a tuple.
    factored = lowrank_apply(lambda tree, inputs: run(tree, *inputs))
    return jax.jit(lambda tree, *args: factored(tree, args))
  return jax.jit(run)  # decode-once: the caller decoded the tree


def generate(
  apply_or_model: ZooModel | Callable[..., Any],
  params: Any,
  prompt_ids: Any,
  max_new_tokens: int,
  *,
  temperature: float = 0.0,
  top_k: int | None = None,
  key: jax.Array | None = None,
  max_len: int | None = None,
  eos_id: int | None = None,
  serving: str | None = None,
  kv_bits: int | None = None,
  prompt_lengths: Any = None,
) -> Generation:
  """Generates `max_new_tokens` tokens after each prompt, in one jitted program.

  Args:
    apply_or_model: a decoder `ZooModel` (with a KV cache when its module has one), or a
      causal LM's `apply(params, tokens) -> logits` (recomputed over the buffer each token).
    params: its float param tree, or a compressed tree.
    prompt_ids: (B, P) int token ids, P >= 1: every row a whole prompt, or prompts of
      different lengths right-padded to P (any id) with `prompt_lengths`.
    max_new_tokens: tokens to generate per row (fewer when every row reached `eos_id`).
    temperature: 0 is greedy (argmax); above 0 the logits are divided by it and sampled.
    top_k: sample only among the `top_k` most likely tokens (ties at the k-th logit included).
    key: PRNG key; required when `temperature > 0`.
    max_len: positions of the KV cache (or the recomputed buffer); default
      `P + max_new_tokens`. Must hold the prompt and every new token.
    eos_id: a token that ends a row: later positions repeat it, the loop stops early once
      every row has produced it.
    serving: None (decode the compressed tree inside the program), or a serving mode of
      `jaxshrink.serving.MODES` (e.g. `"integer"` for the int8 path of W8A8 kernels).
    kv_bits: None for a KV cache in the activation dtype; 8 or 4 stores keys and values as
      integer codes with one scale per token and head (`jaxshrink.kvcache`), for a KV-cache
      decoder only.
    prompt_lengths: None, or (B,) ints in 1..P: row `b`'s prompt is `prompt_ids[b, :n_b]`, and
      its new tokens follow it (positions `n_b ...`).

  Returns:
    `Generation(tokens (B, max_new_tokens) int32, lengths (B,) int32)`.

  Raises:
    InvalidValueError: a prompt longer than the cache, bad sizes, `top_k` or temperature.
    UsageError: a model that is not a causal decoder, or an unknown serving mode.

  >>> out = generate(model, params, jnp.array([[5, 17, 3]]), 4)
  >>> out.tokens.shape, out.tokens.dtype
  ((1, 4), dtype('int32'))
  """
  run, args = _prepare(
    apply_or_model, params, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
    key=key, max_len=max_len, eos_id=eos_id, serving=serving, kv_bits=kv_bits,
    prompt_lengths=prompt_lengths,
  )  # fmt: skip
  return run(*args)


def lower(
  apply_or_model: ZooModel | Callable[..., Any],
  params: Any,
  prompt_ids: Any,
  max_new_tokens: int,
  **options: Any,
) -> jax.stages.Lowered:
  """The program `generate` runs for these arguments, lowered and not run (its compiled
  `memory_analysis()` and cost, or its text). `options` are `generate`'s keywords."""
  run, args = _prepare(apply_or_model, params, prompt_ids, max_new_tokens, **options)
  return run.lower(*args)


def _prepare(
  apply_or_model, params, prompt_ids, max_new_tokens, *, temperature=0.0, top_k=None, key=None,
  max_len=None, eos_id=None, serving=None, kv_bits=None, prompt_lengths=None,
):  # fmt: skip
  """Checks `generate`'s arguments; returns its jitted program and the arguments to call it on."""
  decoder = _decoder(apply_or_model, kv_bits)
  prompt = jnp.asarray(prompt_ids)
  if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer) or prompt.shape[1] < 1:
    raise InvalidValueError(
      f"`prompt_ids` must be (batch, length >= 1) integer token ids; got shape {prompt.shape} "
      f"and dtype {prompt.dtype}. Wrap one prompt as `ids[None]`."
    )
  steps = _positive_int(max_new_tokens, "max_new_tokens")
  length = int(prompt.shape[1])
  lengths = _prompt_lengths(prompt_lengths, prompt.shape)
  max_len = length + steps if max_len is None else _positive_int(max_len, "max_len")
  if length > max_len:
    raise InvalidValueError(
      f"the prompt has {length} tokens but the KV cache holds `max_len`={max_len} positions; "
      f"pass max_len >= {length + steps} (prompt + max_new_tokens) or a shorter prompt."
    )
  if length + steps > max_len:
    raise InvalidValueError(
      f"the prompt's {length} tokens plus `max_new_tokens`={steps} need {length + steps} "
      f"positions but the cache holds `max_len`={max_len}; raise max_len or generate fewer."
    )
  temperature = float(temperature)
  if not np.isfinite(temperature) or temperature < 0:
    raise InvalidValueError(f"`temperature` must be >= 0 (0 is greedy); got {temperature}.")
  if top_k is not None:
    top_k = _positive_int(top_k, "top_k")
  if temperature > 0 and key is None:
    raise InvalidValueError(
      f"sampling (`temperature`={temperature}) needs a PRNG `key`, e.g. key=jax.random.key(0); "
      "or pass temperature=0 for greedy decoding."
    )
  if eos_id is not None and (
    isinstance(eos_id, bool) or not isinstance(eos_id, (int, np.integer)) or eos_id < 0
  ):
    raise InvalidValueError(f"`eos_id` must be None or a token id >= 0; got {eos_id!r}.")
  eos_id = None if eos_id is None else int(eos_id)
  key = jax.random.key(0) if key is None else key
  tree = params
  if serving is not None:
    from jaxshrink.serving import check_mode

    check_mode(serving, where="`generate(serving=...)`")
    if serving == "decode-once":
      tree = jax.jit(materialize)(params)
  run = _compiled(decoder, steps, max_len, temperature, top_k, eos_id, serving)
  return run, (tree, prompt.astype(jnp.int32), lengths, key)


def _prompt_lengths(lengths: Any, shape: tuple[int, ...]) -> jax.Array | None:
  """`prompt_lengths` checked against the prompt batch `shape` (B, P), as int32 (B,)."""
  if lengths is None:
    return None
  values = np.asarray(lengths)
  if (
    values.shape != shape[:1]
    or not np.issubdtype(values.dtype, np.integer)
    or values.min() < 1
    or values.max() > shape[1]
  ):
    raise InvalidValueError(
      f"`prompt_lengths` must hold one int per prompt row, each in 1..{shape[1]} (the padded "
      f"prompt length); got {values.tolist()!r} for prompts of shape {tuple(shape)}. Right-pad "
      "the prompts to the longest and pass their lengths."
    )
  return jnp.asarray(values, jnp.int32)


def _positive_int(value: Any, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise InvalidValueError(f"`{name}` must be a positive int; got {value!r}.")
  return int(value)
