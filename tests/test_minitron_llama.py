"""Structured pruning of a Llama decoder (`jaxshrink.sparsity.minitron_llama`, stage
`structured`): grouped-query heads stay grouped, the shrunk model computes what the masked one
does, the refit helps, and the recorded source rebuilds the smaller model."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshrink.errors import InvalidValueError, UsageError
from jaxshrink.models.base import zoo_model
from jaxshrink.models.configured import configure_model, load_configured
from jaxshrink.models.llama import LlamaConfig, LlamaForCausalLM
from jaxshrink.pipeline import Pipeline
from jaxshrink.sparsity import minitron_llama as ml
from jaxshrink.sparsity.minitron import PruningPlan

VOCAB = 64
# 6 query heads in 2 groups of 3, q/k/v biases (Qwen2), an untied head.
CONFIG = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=3,
                     num_heads=6, num_kv_heads=2, head_dim=8, attention_bias=True,
                     max_positions=32)  # fmt: skip


def _model(config=CONFIG):
  return zoo_model(
    "llama-micro", functools.partial(LlamaForCausalLM, config), (16,), "int32", "micro",
    data="corpus-bpe", metric="perplexity", train_steps=1, learning_rate=1e-3, batch_size=4,
  )  # fmt: skip


def _ids(rows=48, length=16, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (rows, length)).astype(np.int32)


@pytest.fixture(scope="module")
def micro():
  model = _model()
  params = model.init(jax.random.key(0))
  # Random weights make every head alike: value head 1 is made 3x larger, so the query heads
  # of its group (3, 4, 5) read larger context vectors.
  params = jax.tree.map(lambda a: a, params)
  for i in range(CONFIG.num_layers):
    v = params["model"]["layers"][i]["self_attn"]["v_proj"]
    v["kernel"] = v["kernel"] * jnp.repeat(jnp.asarray([1.0, 3.0]), 8)[None, :]
    v["bias"] = v["bias"] + 0.01
  batches = ml.training_windows(_ids(), 3, 16)
  return model, params, batches, ml.llama_importance(model, params, batches)


def test_importance_shapes(micro):
  _, _, batches, scores = micro
  assert [len(b) for b in batches] == [16, 16, 16]
  assert [h.shape for h in scores.heads] == [(6,)] * 3
  assert [c.shape for c in scores.channels] == [(64,)] * 3
  assert scores.layers.shape == (3,) and np.all(scores.layers > 0)
  for heads in scores.heads:
    assert heads[3:].min() > 2 * heads[:3].max()  # the group of the larger value head


@pytest.mark.parametrize("fraction", [0.9, 0.67, 0.4, 0.15])
def test_plan_keeps_whole_groups_within_the_budget(micro, fraction):
  _, _, _, scores = micro
  plan = ml.plan_llama(scores, CONFIG, params=fraction)
  _, overrides = ml.shrink_llama(micro[1], plan, CONFIG)
  small = dataclasses.replace(CONFIG, **overrides)  # a valid LlamaConfig: groups divide heads
  assert small.num_heads % small.num_kv_heads == 0 and small.head_size == 8
  before, after = ml.param_counts(CONFIG, overrides)
  assert after <= fraction * before
  for heads in plan.heads:
    groups = ml.kept_groups(heads, CONFIG)
    assert len(groups) == small.num_kv_heads and len(heads) == small.num_heads
    assert [h // 3 for h in heads] == sorted(h // 3 for h in heads)  # group by group


def test_heads_per_group_go_first_then_whole_groups(micro):
  _, _, _, scores = micro
  # 90% of a layer's params leaves room for 2 of the 3 query heads in each group.
  plan = ml.plan_llama(scores, CONFIG, params=0.9, channels=False)
  assert ml.kept_groups(plan.heads[0], CONFIG) == (0, 1) and len(plan.heads[0]) == 4
  tiny = ml.plan_llama(scores, CONFIG, params=0.1, channels=False)
  assert [len(h) for h in tiny.heads] == [1, 1, 1]
  assert ml.kept_groups(tiny.heads[0], CONFIG) == (1,)  # the stronger group (heads 3..5)


def test_shrunk_model_computes_what_the_masked_model_computes(micro):
  model, params, batches, scores = micro
  x = jnp.asarray(batches[1])
  hand = PruningPlan(layers=(0, 1, 2), heads=((0, 2, 3, 5), (1, 2, 4, 5), (3, 4, 5)),
                     channels=((1, 4, 9), (2, 3, 5), (0, 31, 63)))  # fmt: skip
  with pytest.raises(InvalidValueError, match="same widths in every layer"):
    ml.shrink_llama(params, hand, CONFIG)
  uneven = PruningPlan(layers=(0,), heads=((0, 1, 3),), channels=((1,),))
  with pytest.raises(InvalidValueError, match="same number of query heads in each kept"):
    ml.shrink_llama(params, uneven, CONFIG)
  for fraction in (0.67, 0.3):
    plan = ml.plan_llama(scores, CONFIG, params=fraction)
    small, overrides = ml.shrink_llama(params, plan, CONFIG)
    small_model = configure_model(model, overrides)
    assert jax.tree.map(jnp.shape, small_model.init(jax.random.key(0))) == jax.tree.map(
      jnp.shape, small
    )
    want = model.apply(ml.masked_llama(params, plan, CONFIG), x)
    np.testing.assert_allclose(small_model.apply(small, x), want, atol=1e-5)


def test_refit_brings_the_shrunk_model_closer_to_float(micro):
  model, params, batches, scores = micro
  plan = ml.plan_llama(scores, CONFIG, params=0.5)
  small, overrides = ml.shrink_llama(params, plan, CONFIG)
  refit = ml.refit_llama(model.apply, params, small, plan, CONFIG, batches)
  apply = configure_model(model, overrides).apply
  x = jnp.asarray(_ids(8, seed=3))  # rows the refit never saw
  full = model.apply(params, x)
  before = float(jnp.mean((apply(small, x) - full) ** 2))
  after = float(jnp.mean((apply(refit, x) - full) ** 2))
  assert after < 0.5 * before
  # Nothing removed: the refit returns the kernels it was given (up to the damping).
  whole = ml.plan_llama(scores, CONFIG, params=1.0)
  kept, _ = ml.shrink_llama(params, whole, CONFIG)
  same = ml.refit_llama(model.apply, params, kept, whole, CONFIG, batches, damp=0.0)
  np.testing.assert_allclose(model.apply(same, x), full, atol=1e-4)


def test_dropping_a_layer_skips_it(micro):
  model, params, _, scores = micro
  plan = ml.plan_llama(scores, CONFIG, params=1.0, layers=1)
  dropped = int(np.argmin(scores.layers))
  assert plan.layers == tuple(i for i in range(3) if i != dropped)
  small, overrides = ml.shrink_llama(params, plan, CONFIG)
  assert overrides["num_layers"] == 2
  shrunk = configure_model(model, overrides)
  x = jnp.asarray(_ids(4, seed=5))
  # Reference: the float model with that layer's blocks zeroed (a pre-norm layer adds nothing).
  zeroed = jax.tree.map(lambda a: a, params)
  layer = zeroed["model"]["layers"][dropped]
  layer["self_attn"]["o_proj"]["kernel"] = jnp.zeros_like(layer["self_attn"]["o_proj"]["kernel"])
  layer["mlp"]["down_proj"]["kernel"] = jnp.zeros_like(layer["mlp"]["down_proj"]["kernel"])
  np.testing.assert_allclose(shrunk.apply(small, x), model.apply(zeroed, x), atol=1e-5)


def test_structured_stage_on_a_llama_records_a_rebuildable_source(micro):
  from jaxshrink.recipes import stage_kinds

  model, params, _, _ = micro
  data = type("Data", (), {"x_train": _ids(64), "name": "ids", "kind": "language_model"})()
  pipeline = Pipeline(model=model, dataset=data, float_model=model, float_params=params,
                      tree=params, key=jax.random.key(1), model_source=model.name)  # fmt: skip
  kind = stage_kinds()["structured"]
  out = kind.run(pipeline, {**kind.options, "params": 0.6, "calibration_rows": 16})
  found = out.log[-1]["structured"]
  assert found["kept_fraction"] <= 0.6 and found["num_heads"] % found["num_kv_heads"] == 0
  assert found["calibration"] == "64 training windows" and found["ranking"] == "refit"
  assert out.model_source.startswith("llama-micro(num_layers=3, num_heads=")
  rebuilt = load_configured(out.model_source, lambda name: model)
  x = jnp.asarray(_ids(4, seed=7))
  np.testing.assert_allclose(rebuilt.apply(out.tree, x), out.model.apply(out.tree, x), atol=1e-6)
  with pytest.raises(UsageError, match="how many of the 3 layers"):
    kind.run(pipeline, {**kind.options, "layers": 3})
  with pytest.raises(UsageError, match="a Llama decoder keeps one width .* got 'allocated'"):
    kind.run(pipeline, {**kind.options, "widths": "allocated"})
  refused = "`calibration_data: corpus` of stage `structured` feeds MiniLM token ids"
  with pytest.raises(UsageError, match=refused + ".*Use `calibration_data: train`"):
    kind.run(pipeline, {**kind.options, "calibration_data": "corpus"})


def test_shrunk_llama_exports_to_transformers(micro, tmp_path):
  pytest.importorskip("transformers")
  import torch
  from transformers import AutoModelForCausalLM

  from jaxshrink.interop.hf import export_hf

  model, params, batches, scores = micro
  plan = ml.plan_llama(scores, CONFIG, params=0.5)
  small, overrides = ml.shrink_llama(params, plan, CONFIG)
  small_model = configure_model(model, overrides)
  export_hf(small, small_model, tmp_path / "hf")
  hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
  assert hf.config.num_attention_heads == overrides["num_heads"]
  assert hf.config.num_key_value_heads == overrides["num_kv_heads"]
  x = _ids(2, seed=9)
  with torch.no_grad():
    got = hf(torch.as_tensor(x, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, np.asarray(small_model.apply(small, jnp.asarray(x))), atol=1e-4)
