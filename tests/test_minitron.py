"""Minitron-style structured pruning (`jaxshrink.sparsity.minitron`, stage `structured`)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshrink.errors import InvalidValueError, UsageError
from jaxshrink.models.base import zoo_model
from jaxshrink.models.bert import BertConfig, BertEncoder, mean_pool_normalize
from jaxshrink.pipeline import length_sorted_batches
from jaxshrink.sparsity import minitron

CONFIG = BertConfig(num_layers=3, hidden_size=16, num_heads=4, intermediate_size=32,
                    vocab_size=64, max_positions=12)  # fmt: skip


def _model(config=CONFIG):
  return zoo_model("bert-tiny", functools.partial(BertEncoder, config), (12,), "int32",
                   "test encoder", data="minilm-sentences", metric="cosine", train_steps=1,
                   learning_rate=1e-3, batch_size=1)  # fmt: skip


def _ids(rows=40, length=12, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, CONFIG.vocab_size, size=(rows, length)).astype(np.int32)
  lengths = rng.integers(3, length + 1, size=rows)
  ids[np.arange(length)[None, :] >= lengths[:, None]] = CONFIG.pad_id
  return ids


@pytest.fixture(scope="module")
def tiny():
  model = _model()
  params = model.init(jax.random.key(0))
  batches = length_sorted_batches(_ids(), 2, 16, 0)
  return model, params, batches, minitron.importance(model, params, batches)


def test_length_sorted_batches_group_by_length():
  ids = _ids()
  batches = length_sorted_batches(ids, 2, 16, 0)
  assert [b.shape[0] for b in batches] == [16, 16]
  assert all(b.dtype == np.int32 for b in batches)
  lengths = [int((b != 0).sum(axis=1).max()) for b in batches]
  assert [b.shape[1] for b in batches] == lengths and lengths[0] <= lengths[1]
  assert sorted(np.concatenate([(b != 0).sum(1) for b in batches]).tolist()) == sorted(
    (ids[:32] != 0).sum(1).tolist()
  )


def test_importance_shapes_and_zeroed_structures(tiny):
  model, params, batches, scores = tiny
  assert [s.shape for s in scores.heads] == [(4,)] * 3
  assert [s.shape for s in scores.channels] == [(32,)] * 3
  assert scores.layers.shape == (3,) and np.all(np.isfinite(scores.layers))
  assert np.all(scores.layers >= 0) and np.all(scores.layers <= 2)
  # A head whose value projection is zero has a zero context; a channel whose intermediate
  # column is zero has GELU(0) = 0. Both rank last.
  zeroed = jax.tree.map(np.array, params)
  layer = zeroed["encoder"]["layer_1"]
  layer["attention"]["value"]["kernel"][:, 8:12] = 0
  layer["attention"]["value"]["bias"][8:12] = 0
  layer["intermediate"]["kernel"][:, 5] = 0
  layer["intermediate"]["bias"][5] = 0
  found = minitron.importance(model, zeroed, batches)
  assert found.heads[1][2] == 0 and np.all(np.delete(found.heads[1], 2) > 0)
  assert found.channels[1][5] == 0 and int(np.argmin(found.channels[1])) == 5


def test_layer_param_count_matches_tree(tiny):
  _, params, _, _ = tiny
  encoder = sum(a.size for a in jax.tree.leaves(params["encoder"]))
  assert minitron.encoder_param_count(CONFIG) == encoder
  assert minitron.layer_param_count(384, 12, 32, 1536) == 1774464


def test_plan_for_minilm_sizes_keeps_two_thirds():
  config = BertConfig()
  rng = np.random.default_rng(0)
  scores = minitron.Importance(
    heads=tuple(rng.random(12) for _ in range(6)),
    channels=tuple(rng.random(1536) for _ in range(6)),
    layers=np.array([0.3, 0.2, 0.05, 0.4, 0.1, 0.5], np.float32),
  )
  plan = minitron.plan_pruning(scores, config, params=0.67)
  assert plan.layers == tuple(range(6))
  assert {len(h) for h in plan.heads} == {8} and {len(c) for c in plan.channels} == {1024}
  assert plan.heads[0] == tuple(sorted(np.argsort(-scores.heads[0])[:8].tolist()))
  kept = BertConfig(head_dim=32, layer_heads=(8,) * 6, layer_intermediate=(1024,) * 6)
  fraction = minitron.encoder_param_count(kept) / minitron.encoder_param_count(config)
  assert 0.66 < fraction <= 0.67
  deep = minitron.plan_pruning(scores, config, params=0.67, layers=1)
  assert deep.layers == (0, 1, 3, 4, 5)  # layer 2 changes its input least
  heads_only = minitron.plan_pruning(scores, config, params=0.9, channels=False)
  assert len(heads_only.channels[0]) == 1536 and len(heads_only.heads[0]) < 12
  full = minitron.plan_pruning(scores, config, params=1.0)
  assert {len(h) for h in full.heads} == {12} and {len(c) for c in full.channels} == {1536}
  with pytest.raises(InvalidValueError, match="fraction of non-embedding params"):
    minitron.plan_pruning(scores, config, params=1.5)
  with pytest.raises(InvalidValueError, match="how many of the 6 layers"):
    minitron.plan_pruning(scores, config, layers=6)


def test_shrunk_model_computes_what_the_masked_model_computes(tiny):
  model, params, batches, scores = tiny
  plan = minitron.PruningPlan(
    layers=(0, 1, 2), heads=((0, 3), (1,), (0, 1, 2)), channels=((1, 4, 9), tuple(range(20)),
                                                                  (0, 31)),
  )  # fmt: skip
  small, overrides = minitron.shrink_bert(params, plan, CONFIG)
  assert overrides == {"num_layers": 3, "head_dim": 4, "layer_heads": (2, 1, 3),
                       "layer_intermediate": (3, 20, 2)}  # fmt: skip
  small_model = _model(dataclasses.replace(CONFIG, **overrides))
  assert small["encoder"]["layer_0"]["attention"]["query"]["kernel"].shape == (16, 8)
  assert small["encoder"]["layer_1"]["output"]["kernel"].shape == (20, 16)
  masked = minitron.masked_params(params, plan, CONFIG)
  x = jnp.asarray(batches[1])
  want = jax.jit(model.apply)(masked, x)
  got = jax.jit(small_model.apply)(small, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
  # The planned shrink, too (uniform widths).
  plan = minitron.plan_pruning(scores, CONFIG, params=0.6)
  small, overrides = minitron.shrink_bert(params, plan, CONFIG)
  assert minitron.encoder_param_count(dataclasses.replace(CONFIG, **overrides)) <= int(
    0.6 * minitron.encoder_param_count(CONFIG)
  )
  got = _model(dataclasses.replace(CONFIG, **overrides)).apply(small, x)
  want = model.apply(minitron.masked_params(params, plan, CONFIG), x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def test_dropped_layer_is_skipped(tiny):
  model, params, batches, _ = tiny
  plan = minitron.PruningPlan(layers=(0, 2), heads=((0, 1, 2, 3),) * 2,
                              channels=(tuple(range(32)),) * 2)  # fmt: skip
  small, overrides = minitron.shrink_bert(params, plan, CONFIG)
  assert sorted(small["encoder"]) == ["layer_0", "layer_1"] and overrides["num_layers"] == 2
  got = _model(dataclasses.replace(CONFIG, **overrides)).apply(small, jnp.asarray(batches[0]))
  from flax import nnx

  module = BertEncoder(CONFIG, rngs=nnx.Rngs(0))
  nnx.update(module, nnx.State(params))
  x = jnp.asarray(batches[0])
  mask = x != CONFIG.pad_id
  hidden = module.embeddings(x)
  for index in (0, 2):
    hidden = getattr(module.encoder, f"layer_{index}")(hidden, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(mean_pool_normalize(hidden, mask)),
                             atol=2e-6)  # fmt: skip


def test_bert_config_checks_layer_intermediate():
  assert BertConfig(num_layers=2, layer_intermediate=(8, 16)).intermediate(1) == 16
  assert BertConfig().intermediate(3) == 1536
  with pytest.raises(InvalidValueError, match="layer_intermediate"):
    BertConfig(num_layers=2, layer_intermediate=(8,))


def _pipeline(model, params):
  from jaxshrink.pipeline import Pipeline

  data = type("Data", (), {"x_train": _ids(64), "name": "ids", "kind": "embedding"})()
  return Pipeline(model=model, dataset=data, float_model=model, float_params=params,
                  tree=params, key=jax.random.key(1), model_source=model.name)  # fmt: skip


def test_structured_stage_records_a_rebuildable_source(tiny):
  from jaxshrink.models.configured import load_configured
  from jaxshrink.recipes import stage_kinds

  model, params, batches, _ = tiny
  kind = stage_kinds()["structured"]
  options = {**kind.options, "params": 0.6, "layers": 1, "calibration_rows": 16}
  out = kind.run(_pipeline(model, params), options)
  found = out.log[-1]["structured"]
  assert len(found["kept_layers"]) == 2 and found["kept_fraction"] <= 0.6
  assert out.model_source.startswith("bert-tiny(num_layers=2, head_dim=4, layer_heads=(")
  rebuilt = load_configured(out.model_source, lambda name: model)
  x = jnp.asarray(batches[0])
  np.testing.assert_allclose(np.asarray(rebuilt.apply(out.tree, x)),
                             np.asarray(out.model.apply(out.tree, x)), atol=1e-6)  # fmt: skip
  assert jax.tree.map(jnp.shape, rebuilt.init(jax.random.key(0))) == jax.tree.map(
    jnp.shape, out.tree
  )
  with pytest.raises(UsageError, match="`params` is the fraction"):
    kind.run(_pipeline(model, params), {**kind.options, "params": 0})
  with pytest.raises(UsageError, match="`heads` of stage `structured`"):
    kind.run(_pipeline(model, params), {**kind.options, "heads": "yes"})


def test_recover_after_dropped_layers_learns_each_layer_from_the_float_layer_it_was_cut_from(tiny):
  from jaxshrink.pipeline import run_stage
  from jaxshrink.recipes import stage_kinds
  from jaxshrink.recover.stage import renumbered_layers

  model, params, _, _ = tiny
  kinds = stage_kinds()
  options = {**kinds["structured"].options, "params": 0.6, "layers": 1, "calibration_rows": 16}
  cut = run_stage(_pipeline(model, params), "structured", options)
  kept = cut.log[-1]["structured"]["kept_layers"]
  assert len(kept) == 2 and renumbered_layers(cut.log) == ("encoder/layer_{}", kept)
  features = ["encoder/layer_0", {"student": "encoder/layer_1/output", "weight": 2.0},
              {"student": "encoder/layer_1", "teacher": "encoder/layer_0"}]  # fmt: skip
  options = {**kinds["recover"].options, "steps": 2, "data": "train", "features": features}
  out = run_stage(cut, "recover", options)
  assert out.log[-1]["recovered"]["features"] == [
    ["encoder/layer_0", f"encoder/layer_{kept[0]}"],
    ["encoder/layer_1/output", f"encoder/layer_{kept[1]}/output"],
    ["encoder/layer_1", "encoder/layer_0"],  # a `teacher` given is kept as given
  ]
  # A second cut numbers the first one's layers.
  options = {**kinds["structured"].options, "params": 0.5, "layers": 1, "calibration_rows": 16}
  again = run_stage(out, "structured", options)
  second = again.log[-1]["structured"]["kept_layers"]
  assert renumbered_layers(again.log) == ("encoder/layer_{}", [kept[i] for i in second])
  # After a distill stage the layers are a student's: the same path in both models again.
  assert renumbered_layers((*cut.log, {"stage": "distill"})) is None
  assert renumbered_layers(_pipeline(model, params).log) is None


def test_structured_stage_calibrates_on_the_corpus_when_asked(tiny, monkeypatch):
  from jaxshrink import pipeline
  from jaxshrink.recipes import stage_kinds

  model, params, _, _ = tiny
  asked = []

  def corpus(pipeline, stage, option):
    asked.append((stage, option))
    return _ids(80, seed=3)

  monkeypatch.setattr(pipeline, "transfer_corpus", corpus)
  kind = stage_kinds()["structured"]
  options = {**kind.options, "params": 0.7, "calibration_rows": 16, "calibration_batches": 3}
  on_corpus = kind.run(_pipeline(model, params), {**options, "calibration_data": "corpus"})
  assert asked == [("structured", "calibration_data")]
  assert on_corpus.log[-1]["structured"]["calibration"] == "48 transfer-corpus sentences"
  on_train = kind.run(_pipeline(model, params), options)
  assert on_train.log[-1]["structured"]["calibration"] == "48 training sentences"
  with pytest.raises(UsageError, match="`calibration_data` of stage `structured` must be one of"):
    kind.run(_pipeline(model, params), {**options, "calibration_data": "test"})


def test_structured_stage_ranks_by_the_refit_unless_told(tiny, monkeypatch):
  from jaxshrink.recipes import stage_kinds
  from jaxshrink.sparsity import minitron_stage

  model, params, _, _ = tiny
  kind = stage_kinds()["structured"]
  options = {**kind.options, "params": 0.6, "calibration_rows": 16}
  ranked = []
  original = minitron_stage.refit_ranked
  monkeypatch.setattr(
    minitron_stage, "refit_ranked", lambda *a, **k: ranked.append(1) or original(*a, **k)
  )
  out = kind.run(_pipeline(model, params), options)
  assert out.log[-1]["structured"]["ranking"] == "refit" and ranked == [1]
  sliced = kind.run(_pipeline(model, params), {**options, "refit": False})
  assert sliced.log[-1]["structured"]["ranking"] == "activation" and ranked == [1]
  by_activation = kind.run(_pipeline(model, params), {**options, "ranking": "activation"})
  assert by_activation.log[-1]["structured"]["ranking"] == "activation"
  with pytest.raises(UsageError, match="`ranking: refit` ranks by the error .* `refit: false`"):
    kind.run(_pipeline(model, params), {**options, "ranking": "refit", "refit": False})
  with pytest.raises(UsageError, match="`ranking` of stage `structured` must be one of"):
    kind.run(_pipeline(model, params), {**options, "ranking": "obs"})
  spread = kind.run(_pipeline(model, params), {**options, "widths": "allocated"})
  found, uniform = spread.log[-1]["structured"], out.log[-1]["structured"]
  assert found["widths"] == "allocated" and uniform["widths"] == "uniform"
  assert sum(found["layer_intermediate"]) <= sum(uniform["layer_intermediate"])
  assert found["kept_fraction"] <= uniform["kept_fraction"]
  shallow = kind.run(_pipeline(model, params), {**options, "widths": "allocated", "layers": 1})
  assert len(shallow.log[-1]["structured"]["layer_intermediate"]) == 2
  with pytest.raises(UsageError, match="`widths: allocated` spreads .* ranking: activation"):
    kind.run(_pipeline(model, params), {**options, "widths": "allocated", "ranking": "activation"})
  with pytest.raises(UsageError, match="`widths` of stage `structured` must be one of"):
    kind.run(_pipeline(model, params), {**options, "widths": "even"})


def test_structured_stage_refuses_models_without_bert_config():
  from jaxshrink.models.registry import get_model
  from jaxshrink.recipes import stage_kinds

  model = get_model("digits-mlp")
  kind = stage_kinds()["structured"]
  with pytest.raises(UsageError, match="needs a BERT encoder"):
    kind.run(_pipeline(model, {}), dict(kind.options))


def test_minilm_source_rebuilds_the_shrunk_shapes():
  from jaxshrink.models.registry import load_model

  source = ("minilm-l6(num_layers=5, head_dim=32, layer_heads=(8, 8, 8, 8, 8), "
            "layer_intermediate=(1024, 1024, 1024, 1024, 1024))")  # fmt: skip
  model = load_model(source)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  assert sorted(shapes["encoder"]) == [f"layer_{i}" for i in range(5)]
  layer = shapes["encoder"]["layer_4"]
  assert layer["attention"]["value"]["kernel"].shape == (384, 256)
  assert layer["intermediate"]["kernel"].shape == (384, 1024)


def test_refit_projection_is_the_least_squares_fit_of_the_full_output():
  from jaxshrink.sparsity.refit import refit_projection

  rng = np.random.default_rng(0)
  mix = rng.normal(size=(12, 12))
  x = rng.normal(size=(500, 12)) @ mix + 0.5  # correlated columns with a mean
  kernel, bias = rng.normal(size=(12, 5)), rng.normal(size=5)
  xa = np.concatenate([x, np.ones((500, 1))], axis=1)
  gram = xa.T @ xa
  target = x @ kernel + bias
  same_k, same_b = refit_projection(gram, kernel, bias, np.arange(12), 0.0)
  np.testing.assert_allclose(same_k, kernel, atol=1e-8)
  np.testing.assert_allclose(same_b, bias, atol=1e-8)
  kept = np.array([0, 2, 3, 7, 11])
  fit_k, fit_b = refit_projection(gram, kernel, bias, kept, 0.0)
  solution = np.linalg.lstsq(xa[:, [*kept, 12]], target, rcond=None)[0]
  np.testing.assert_allclose(np.concatenate([fit_k, fit_b[None]]), solution, atol=1e-6)
  sliced = np.linalg.norm(x[:, kept] @ kernel[kept] + bias - target)
  refitted = np.linalg.norm(x[:, kept] @ fit_k + fit_b - target)
  assert refitted < 0.8 * sliced


def test_refit_outputs_keeps_a_full_plan_and_fits_a_pruned_one(tiny):
  from jaxshrink.sparsity.refit import refit_outputs

  model, params, batches, scores = tiny
  full = minitron.PruningPlan(layers=(0, 1, 2), heads=((0, 1, 2, 3),) * 3,
                              channels=(tuple(range(32)),) * 3)  # fmt: skip
  small, _ = minitron.shrink_bert(params, full, CONFIG)
  refitted = refit_outputs(model.apply, params, small, full, CONFIG, batches, damp=0.0)
  for got, want in zip(jax.tree.leaves(refitted), jax.tree.leaves(small), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-3)
  plan = minitron.plan_pruning(scores, CONFIG, params=0.6)
  small, overrides = minitron.shrink_bert(params, plan, CONFIG)
  refitted = refit_outputs(model.apply, params, small, plan, CONFIG, batches)
  assert jax.tree.map(jnp.shape, refitted) == jax.tree.map(jnp.shape, small)
  changed = refitted["encoder"]["layer_0"]["output"]["kernel"]
  assert not np.allclose(
    np.asarray(changed), np.asarray(small["encoder"]["layer_0"]["output"]["kernel"])
  )
  assert refitted["encoder"]["layer_0"]["intermediate"] is not None  # untouched leaves stay
  np.testing.assert_array_equal(
    np.asarray(refitted["encoder"]["layer_0"]["intermediate"]["kernel"]),
    np.asarray(small["encoder"]["layer_0"]["intermediate"]["kernel"]),
  )
  small_model = _model(dataclasses.replace(CONFIG, **overrides))
  x = jnp.asarray(np.concatenate([b[:, : batches[0].shape[1]] for b in batches]))
  want = model.apply(params, x)
  cos = lambda a: float(jnp.mean(jnp.sum(a * want, axis=-1)))  # noqa: E731
  assert cos(small_model.apply(refitted, x)) > cos(small_model.apply(small, x))
