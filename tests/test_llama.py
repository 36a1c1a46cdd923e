"""The Llama decoder: HF-shaped paths, GQA, causality, the KV-cache decode path, `generate`
(greedy, top-k, errors) on float and quantized trees, and the zoo presets (never trained here)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxshrink as js
from jaxshrink.errors import InvalidValueError, UsageError
from jaxshrink.generate import Generation, generate, lower
from jaxshrink.models import get_model
from jaxshrink.models.base import zoo_model
from jaxshrink.models.llama import LlamaConfig, LlamaForCausalLM, decode_functions
from jaxshrink.models.llama_hf import from_hf_name, from_hf_state, to_hf_name, to_hf_state
from jaxshrink.quant.serve import quantized_apply
from jaxshrink.sequential import blocks

VOCAB = 64
MICRO = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, max_positions=32)  # fmt: skip


def micro_model(**overrides):
  config = LlamaConfig(**{**MICRO.__dict__, **overrides})
  return zoo_model(
    "llama-micro", functools.partial(LlamaForCausalLM, config), (16,), "int32", "micro",
    data="corpus-bpe", metric="perplexity", train_steps=1, learning_rate=1e-3, batch_size=4,
  )  # fmt: skip


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def micro(request):
  model = micro_model(tie_embeddings=request.param)
  return model, model.init(jax.random.key(0))


def tokens(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB, jnp.int32)


def greedy_reference(apply, params, prompt, steps):
  seq = prompt
  for _ in range(steps):
    seq = jnp.concatenate([seq, jnp.argmax(apply(params, seq)[:, -1], -1)[:, None]], axis=1)
  return np.asarray(seq[:, prompt.shape[1] :])


def test_paths_map_one_to_one_to_hugging_face_names(micro):
  model, params = micro
  flat = js.flatten(params)
  hf = to_hf_state(params)
  expected = {"model.embed_tokens.weight", "model.norm.weight"}
  for i in range(MICRO.num_layers):
    expected |= {f"model.layers.{i}.{n}.weight" for n in (
      "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
      "post_attention_layernorm")}  # fmt: skip
  tied = model.module.args[0].tie_embeddings
  assert set(hf) == (expected if tied else expected | {"lm_head.weight"})
  assert len(hf) == len(flat)
  for path, leaf in flat.items():
    name, transposed = to_hf_name(path)
    assert from_hf_name(name) == (path, transposed)
    assert transposed == path.endswith("kernel")
    np.testing.assert_array_equal(hf[name], leaf.T if transposed else leaf)
  # PyTorch Linear layout: (out, in).
  assert hf["model.layers.1.self_attn.k_proj.weight"].shape == (16, 32)
  back = from_hf_state({**hf, "model.rotary_emb.inv_freq": np.zeros(4)})
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  with pytest.raises(InvalidValueError, match="model.layers.0.self_attn.qkv.weight"):
    from_hf_name("model.layers.0.self_attn.qkv.weight")


def test_gqa_shapes_and_config_errors():
  flat = js.flatten(
    jax.eval_shape(micro_model(num_heads=8, num_kv_heads=2).init, jax.random.key(0))
  )
  # head_dim 32 // 8 = 4: q has 8 heads, k and v 2.
  assert flat["model/layers/0/self_attn/q_proj/kernel"].shape == (32, 32)
  assert flat["model/layers/0/self_attn/k_proj/kernel"].shape == (32, 8)
  assert flat["model/layers/0/self_attn/v_proj/kernel"].shape == (32, 8)
  assert flat["model/layers/0/self_attn/o_proj/kernel"].shape == (32, 32)
  biased = js.flatten(jax.eval_shape(micro_model(attention_bias=True).init, jax.random.key(0)))
  assert biased["model/layers/0/self_attn/k_proj/bias"].shape == (16,)
  with pytest.raises(InvalidValueError, match=r"`num_kv_heads` \(3\) must divide `num_heads`"):
    LlamaConfig(num_heads=4, num_kv_heads=3, hidden_size=32)
  with pytest.raises(InvalidValueError, match="must be even"):
    LlamaConfig(num_heads=4, num_kv_heads=2, hidden_size=36)


def test_gqa_equals_multi_head_attention_with_repeated_kv_heads():
  """A GQA model equals the MHA model whose k/v heads are copied to their query groups."""
  gqa = micro_model()
  mha = micro_model(num_kv_heads=4)
  params = gqa.init(jax.random.key(3))
  wide = jax.tree.map(lambda x: x, params)
  for i in range(MICRO.num_layers):
    attn = wide["model"]["layers"][i]["self_attn"]
    for name in ("k_proj", "v_proj"):
      kernel = attn[name]["kernel"].reshape(32, 2, 1, 8)
      attn[name]["kernel"] = jnp.broadcast_to(kernel, (32, 2, 2, 8)).reshape(32, 32)
  x = tokens(4, (2, 9))
  np.testing.assert_allclose(gqa.apply(params, x), mha.apply(wide, x), rtol=1e-5, atol=1e-5)


def test_logits_at_t_do_not_depend_on_later_tokens(micro):
  model, params = micro
  apply = jax.jit(model.apply)
  x = tokens(1, (2, 10))
  changed = x.at[:, 6:].set((x[:, 6:] + 7) % VOCAB)
  a, b = apply(params, x), apply(params, changed)
  np.testing.assert_array_equal(a[:, :6], b[:, :6])
  assert not np.allclose(a[:, 6:], b[:, 6:])


def test_kv_cache_decode_matches_the_full_forward_step_by_step(micro):
  model, params = micro
  decode, init_cache = decode_functions(model.module)
  decode = jax.jit(decode)
  x = tokens(2, (3, 9))
  full = model.apply(params, x)
  cache = init_cache(3, 12)
  assert cache.keys[0].shape == (3, 12, MICRO.num_kv_heads, 8) and len(cache.values) == 2
  logits, cache = decode(params, x[:, :4], cache, 0)  # prefill
  np.testing.assert_allclose(logits, full[:, :4], rtol=1e-5, atol=1e-5)
  for t in range(4, 9):
    logits, cache = decode(params, x[:, t : t + 1], cache, jnp.int32(t))
    np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
  # The cache holds each position's keys where the full forward put them.
  assert np.all(np.asarray(cache.keys[1][:, 9:]) == 0)


def test_greedy_generate_equals_argmax_of_repeated_full_forwards(micro):
  model, params = micro
  prompt = tokens(5, (2, 5))
  want = greedy_reference(jax.jit(model.apply), params, prompt, 7)
  out = generate(model, params, prompt, 7)
  assert isinstance(out, Generation) and out.tokens.dtype == jnp.int32
  np.testing.assert_array_equal(out.tokens, want)
  np.testing.assert_array_equal(out.lengths, [7, 7])
  # A plain apply has no cache: the buffer is recomputed, with the same tokens.
  np.testing.assert_array_equal(generate(model.apply, params, prompt, 7).tokens, want)
  # A longer cache changes nothing.
  np.testing.assert_array_equal(generate(model, params, prompt, 7, max_len=20).tokens, want)
  # `lower` gives the same program, not run: one loop over the decode steps.
  assert "while" in lower(model, params, prompt, 7).as_text()


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_prompts_of_different_lengths_generate_as_they_would_alone(micro, kv_bits):
  model, params = micro
  lengths = [3, 7, 5]
  padded = np.array(tokens(11, (3, 7)))
  for row, n in enumerate(lengths):
    padded[row, n:] = 63  # padding: any id, overwritten before it could be read
  out = generate(model, params, padded, 6, prompt_lengths=lengths, kv_bits=kv_bits)
  for row, n in enumerate(lengths):
    alone = generate(model, params, padded[row : row + 1, :n], 6, kv_bits=kv_bits)
    np.testing.assert_array_equal(out.tokens[row], alone.tokens[0])
  # Without a cache (the buffer recomputed each step), the same tokens.
  if kv_bits is None:
    plain = generate(model.apply, params, padded, 6, prompt_lengths=lengths)
    np.testing.assert_array_equal(plain.tokens, out.tokens)
  # On a quantized tree in the integer serving mode too (the decode loop replayed).
  ctree = js.quantize_params(params, ".*proj/kernel", js.QuantSpec(bits=8))
  got = generate(model, ctree, padded, 6, prompt_lengths=lengths, serving="integer")
  for row, n in enumerate(lengths):
    alone = generate(model, ctree, padded[row : row + 1, :n], 6, serving="integer")
    np.testing.assert_array_equal(got.tokens[row], alone.tokens[0])
  for bad in ([3, 8, 5], [0, 7, 5], [3, 7], [3.0, 7.0, 5.0]):
    with pytest.raises(InvalidValueError, match=r"`prompt_lengths` must hold one int per prompt"):
      generate(model, params, padded, 6, prompt_lengths=bad)


def test_eos_stops_a_row_and_fills_it():
  model = micro_model()
  params = model.init(jax.random.key(0))
  prompt = tokens(5, (2, 5))
  free = np.asarray(generate(model, params, prompt, 7).tokens)
  eos = int(free[0, 2])
  out = generate(model, params, prompt, 7, eos_id=eos)
  row = np.asarray(out.tokens[0])
  first = int(np.argmax(row == eos))
  np.testing.assert_array_equal(row[: first + 1], free[0, : first + 1])
  assert np.all(row[first:] == eos) and int(out.lengths[0]) == first + 1


def test_top_k_sampling_only_picks_among_the_top_k():
  model = micro_model()
  params = model.init(jax.random.key(0))
  apply = jax.jit(model.apply)
  prompt = tokens(6, (4, 3))
  k = 3
  seen_non_greedy = False
  for seed in range(3):
    out = generate(model, params, prompt, 6, temperature=2.0, top_k=k, key=jax.random.key(seed))
    seq = jnp.concatenate([prompt, out.tokens], axis=1)
    logits = np.asarray(apply(params, seq))
    for t in range(6):
      step = logits[:, 2 + t]
      top = np.argsort(-step, axis=-1)[:, :k]
      picked = np.asarray(out.tokens[:, t])
      assert all(picked[b] in top[b] for b in range(4)), (seed, t)
      seen_non_greedy |= bool(np.any(picked != top[:, 0]))
  assert seen_non_greedy  # at temperature 2 some draws leave the argmax
  same = generate(model, params, prompt, 6, temperature=2.0, top_k=k, key=jax.random.key(0))
  np.testing.assert_array_equal(
    same.tokens,
    generate(model, params, prompt, 6, temperature=2.0, top_k=k, key=jax.random.key(0)).tokens,
  )


def test_generate_errors():
  model = micro_model()
  params = model.init(jax.random.key(0))
  prompt = tokens(0, (1, 5))
  with pytest.raises(InvalidValueError, match=r"prompt has 5 tokens .* `max_len`=4 .*max_len >= 8"):
    generate(model, params, prompt, 3, max_len=4)
  with pytest.raises(InvalidValueError, match=r"need 8 positions .* `max_len`=6"):
    generate(model, params, prompt, 3, max_len=6)
  with pytest.raises(InvalidValueError, match="needs a PRNG `key`"):
    generate(model, params, prompt, 3, temperature=0.5)
  with pytest.raises(InvalidValueError, match=r"`top_k`=65 exceeds the vocabulary of 64"):
    generate(model, params, prompt, 3, temperature=1.0, top_k=65, key=jax.random.key(0))
  with pytest.raises(InvalidValueError, match="`prompt_ids` must be"):
    generate(model, params, prompt[0], 3)
  with pytest.raises(InvalidValueError, match="`max_new_tokens` must be a positive int"):
    generate(model, params, prompt, 0)
  digits = get_model("digits-mlp")
  with pytest.raises(UsageError, match="causal language model.*'digits-mlp'.*'accuracy'"):
    generate(digits, None, prompt, 3)
  with pytest.raises(UsageError, match=r"causal language model.*returns \(1, 10\)"):
    generate(lambda p, x: jnp.zeros((x.shape[0], 10)), params, prompt, 3)
  with pytest.raises(UsageError, match="`generate\\(serving=...\\)`"):
    generate(model, params, prompt, 3, serving="fast")


def test_llama_300m_builds_abstractly_and_never_trains():
  model = get_model("llama-300m")
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
  assert 290e6 < count < 330e6
  flat = js.flatten(shapes)
  assert flat["model/layers/21/self_attn/k_proj/kernel"].shape == (1024, 256)
  assert "model/layers/22/mlp/up_proj/kernel" not in flat
  # `weights` set: `pretrained` loads them (random, seeded) instead of training.
  assert model.weights is not None
  logits = jax.eval_shape(model.apply, shapes, model.input_spec(2))
  assert logits.shape == (2, 128, 32000)


def test_llama_tiny_matches_its_dataset():
  from jaxshrink.data import bpe_text
  from jaxshrink.models import llama_zoo as llama

  model = get_model("llama-tiny")
  assert (model.data, model.metric) == ("corpus-bpe", "perplexity")
  assert llama.LLAMA_TINY_VOCAB == bpe_text.BPE_VOCAB_SIZE
  assert llama.LLAMA_TINY_CONTEXT == bpe_text.BPE_CONTEXT == model.input_shape[0]
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  assert 10e6 < sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)) < 20e6


def test_sequential_blocks_are_the_numbered_layers():
  model = micro_model()
  params = model.init(jax.random.key(0))
  kernels = [p for p in js.flatten(params) if p.endswith("kernel")]
  grouped = blocks(model.apply, params, tokens(0, (2, 8)), kernels)
  assert [sorted({p.split("/")[2] for p in b}) for b in grouped[:2]] == [["0"], ["1"]]
  assert grouped[2] == ["lm_head/kernel"] and len(grouped[0]) == 7


@pytest.fixture(scope="module")
def calibration():
  return [np.asarray(tokens(10 + i, (4, 16))) for i in range(2)]


def test_gptq_tree_generates_like_its_decoded_weights(calibration):
  model = micro_model()
  params = model.init(jax.random.key(0))
  tree = js.gptq(model.apply, params, calibration, ".*kernel", js.QuantSpec(bits=4, group_size=16))
  flat = js.flatten(tree)
  assert all(isinstance(flat[p], js.QArray) for p in flat if p.endswith("kernel"))
  prompt = tokens(7, (2, 4))
  want = greedy_reference(jax.jit(model.apply), js.materialize(tree), prompt, 6)
  np.testing.assert_array_equal(generate(model, tree, prompt, 6).tokens, want)
  np.testing.assert_array_equal(
    generate(model, tree, prompt, 6, serving="decode-once").tokens, want
  )


def test_w8a8_tree_generates_on_the_integer_path(calibration):
  model = micro_model()
  params = model.init(jax.random.key(0))
  tree = js.ptq(model.apply, params, calibration, ".*kernel", js.QuantSpec(bits=8),
                activation_bits=8)  # fmt: skip
  prompt = tokens(8, (2, 4))
  integer = jax.jit(quantized_apply(model.apply, strict=True))
  want = greedy_reference(integer, tree, prompt, 5)
  np.testing.assert_array_equal(generate(model, tree, prompt, 5, serving="integer").tokens, want)
  # The decode loop's kernels run int8 x int8 -> int32 too, not only the prefill's.
  from jaxshrink.generate import _kv_decoder, _program

  run = quantized_apply(_program(_kv_decoder(model.module), 5, 9, 0.0, None, None), strict=True)
  jaxpr = jax.make_jaxpr(run)(tree, prompt, None, jax.random.key(0))
  loop = next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "while")
  body = str(loop.params["body_jaxpr"])
  assert body.count("preferred_element_type=int32") >= 7 * MICRO.num_layers


def test_corpus_bpe_windows_and_tokenizer_round_trip():
  from jaxshrink.data import bpe_text, get_dataset

  ds = get_dataset("corpus-bpe")
  assert ds.x_train.shape[1] == ds.x_test.shape[1] == 128 and ds.num_classes == 4096
  assert ds.num_test >= 200 and ds.num_train > 15 * ds.num_test
  np.testing.assert_array_equal(ds.x_train[:, 1:], ds.y_train[:, :-1])
  assert 0 <= ds.x_train.min() and ds.x_train.max() < 4096
  train, test = bpe_text.corpus_split()
  assert not set(train) & set(test)
  text = "The quick brown fox jumps over the lazy dog."
  ids = bpe_text.encode(text)
  assert ids.dtype == np.int32 and len(ids) < len(text) // 2
  assert bpe_text.decode(ids) == text


def test_lowrank_tree_generates_factored_and_decoded():
  from jaxshrink.lowrank import lowrank_apply

  model = micro_model()
  tree = js.factorize(model.init(jax.random.key(0)), ".*mlp/.*kernel", rank=8)
  assert isinstance(js.flatten(tree)["model/layers/1/mlp/up_proj/kernel"], js.LowRank)
  prompt = tokens(9, (2, 3))
  want = greedy_reference(jax.jit(lowrank_apply(model.apply)), tree, prompt, 5)
  np.testing.assert_array_equal(generate(model, tree, prompt, 5, serving="factored").tokens, want)
  np.testing.assert_array_equal(generate(model, tree, prompt, 5).tokens, want)


@pytest.mark.parametrize("bits, tol", [(8, 0.02), (4, 0.3)])
def test_a_quantized_kv_cache_decodes_close_to_the_float_cache(micro, bits, tol):
  model, params = micro
  decode, init_cache = decode_functions(model.module)
  seq = tokens(7, (2, 10))
  want = model.apply(params, seq)
  cache = init_cache(2, 12, jnp.float32, bits)
  logits, cache = decode(params, seq[:, :6], cache, 0)
  steps = [logits]
  for t in range(6, 10):
    logits, cache = decode(params, seq[:, t : t + 1], cache, t)
    steps.append(logits)
  got = jnp.concatenate(steps, axis=1)
  err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  assert 0 < err < tol  # quantized, so not exact; close
  assert cache.keys[0].codes.dtype == (jnp.int8 if bits == 8 else jnp.uint8)


def test_kv_bits_need_a_kv_cache_decoder(micro):
  model, params = micro
  out = generate(model, params, tokens(1, (1, 4)), 6, kv_bits=8)
  assert out.tokens.shape == (1, 6)
  tiny = get_model("tiny-lm")
  with pytest.raises(UsageError, match="`kv_bits`=8 quantizes a KV cache"):
    generate(tiny, None, tokens(1, (1, 4)), 2, kv_bits=8)
  with pytest.raises(InvalidValueError, match="`kv_bits` must be one of"):
    generate(model, params, tokens(1, (1, 4)), 2, kv_bits=3)
