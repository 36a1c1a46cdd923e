"""Structured shrinking: heads removed from tiny-lm (and BERT-shaped trees), model sources that
record the smaller sizes, and a shrunk checkpoint evaluated by `jaxshrink eval`."""

import json

import jax
import numpy as np
import pytest

import jaxshrink.sparsity.stage  # noqa: F401  (registers the `prune` stage)
from jaxshrink import models
from jaxshrink.cli import main
from jaxshrink.errors import JaxshrinkError
from jaxshrink.export import save
from jaxshrink.models import bert
from jaxshrink.models.configured import model_source, parse_model_source
from jaxshrink.recipes import parse_recipe, run_recipe
from jaxshrink.sparsity import Heads, Pruner, oneshot_prune, pruned_masks, shrink_model
from jaxshrink.sparsity.shrink import model_heads, shrink, shrink_heads
from jaxshrink.tree import flatten

ATTENTION = ".*attention/.*/kernel"


@pytest.fixture(scope="module")
def lm():
  model = models.get_model("tiny-lm")
  params = models.pretrained(model, progress=False)
  tokens = np.random.default_rng(0).integers(0, 256, (4, 64)).astype(np.int32)
  return model, params, tokens


@pytest.fixture(scope="module")
def head_pruned(lm):
  model, params, _ = lm
  pruner = Pruner(ATTENTION, 0.5, structure=Heads(4))
  masked = oneshot_prune(params, pruner)
  return masked, pruned_masks(masked, pruner)


def _alive(masks):
  """Per block: does any head of its attention keep a weight?"""
  return [bool(np.asarray(masks[f"block_{b}"]["attention"]["query"]["kernel"]).any())
          for b in range(4)]  # fmt: skip


def _size(tree):
  return sum(int(np.size(leaf)) for leaf in flatten(tree).values())


def test_tiny_lm_default_shapes_unchanged(lm):
  model, params, _ = lm
  assert model.module.head_dim is None and model.module.layer_heads is None
  shapes = {p: a.shape for p, a in flatten(jax.eval_shape(model.init, jax.random.key(0))).items()}
  assert shapes == {p: a.shape for p, a in flatten(params).items()}
  assert shapes["block_0/attention/query/kernel"] == (160, 160)


def test_head_shrink_equals_masked_model(lm, head_pruned):
  model, params, tokens = lm
  masked, masks = head_pruned
  small, small_model = shrink_model(model, masked, masks, structure="heads")
  assert small_model.name == "tiny-lm(head_dim=40, layer_heads=(2, 2, 2, 2))"
  assert small_model.module.layer_heads == (2, 2, 2, 2)
  flat, before = flatten(small), flatten(params)
  for block in range(4):
    prefix = f"block_{block}/attention"
    for name in ("query", "key", "value"):
      assert flat[f"{prefix}/{name}/kernel"].shape == (160, 80)
      assert flat[f"{prefix}/{name}/bias"].shape == (80,)
    assert flat[f"{prefix}/out/kernel"].shape == (80, 160)
    assert flat[f"{prefix}/out/bias"].shape == (160,)
    # The kept heads' weights are the original ones, untouched.
    kept = np.flatnonzero(np.asarray(masks["block_0"]["attention"]["query"]["kernel"])[0])
    if block == 0:
      np.testing.assert_array_equal(
        flat[f"{prefix}/query/kernel"], before[f"{prefix}/query/kernel"][:, kept]
      )
  assert _size(params) - _size(small) == 4 * (3 * 160 * 80 + 3 * 80 + 80 * 160)
  a = model.apply(masked, tokens)
  b = small_model.apply(small, tokens)
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
  # The recorded source rebuilds the same smaller model.
  rebuilt = models.load_model(small_model.name)
  np.testing.assert_array_equal(np.asarray(rebuilt.apply(small, tokens)), np.asarray(b))


def test_head_shrink_global_allocation_and_head_size(lm):
  model, params, tokens = lm
  pruner = Pruner(ATTENTION, 0.5, structure=Heads(4), allocation="global")
  masked = oneshot_prune(params, pruner)
  masks = pruned_masks(masked, pruner)
  small, config = shrink(model, masked, masks, structure=Heads(4))
  heads = config["layer_heads"]
  assert config["head_dim"] == 40 and len(heads) == 4
  # 8 of 16 heads pruned over all layers; a layer that lost all keeps one zero head.
  assert sum(heads) == 8 + sum(
    h == 1 and not masks_alive for h, masks_alive in zip(heads, _alive(masks), strict=True)
  )
  _, small_model = shrink_model(model, masked, masks, structure=Heads(4))
  np.testing.assert_allclose(
    np.asarray(small_model.apply(small, tokens)),
    np.asarray(model.apply(masked, tokens)),
    rtol=1e-5,
    atol=5e-5,
  )
  # A shrunk model is pruned again by head size: its layers differ in head count.
  assert model_heads(small_model) == {"head_size": 40}
  again = Pruner(ATTENTION, 0.5, structure=Heads(head_size=40))
  masked2 = oneshot_prune(small, again)
  masks2 = pruned_masks(masked2, again)
  smaller, smaller_model = shrink_model(small_model, masked2, masks2, structure="heads")
  expected = tuple(max(1, h - int(np.round(h / 2))) for h in heads)
  assert smaller_model.module.layer_heads == expected
  np.testing.assert_allclose(
    np.asarray(smaller_model.apply(smaller, tokens)),
    np.asarray(small_model.apply(masked2, tokens)),
    rtol=1e-5,
    atol=5e-5,
  )


def test_heads_recipe_end_to_end_and_eval(lm, tmp_path, capsys):
  model, params, _ = lm
  from jaxshrink import data

  full = data.get_dataset(model.data)
  subset = tmp_path / "text.npz"
  np.savez(subset, x_test=full.x_test[:64], y_test=full.y_test[:64])
  recipe = parse_recipe(
    {
      "model": "tiny-lm",
      "data": str(subset),
      "stages": [
        {"prune": {"target": ATTENTION, "structure": "heads", "sparsity": 0.5,
                   "method": "oneshot", "shrink": True}},
      ],
    }
  )  # fmt: skip
  result = run_recipe(recipe, progress=False)
  pipeline = result.pipeline
  assert pipeline.model_source == "tiny-lm(head_dim=40, layer_heads=(2, 2, 2, 2))"
  assert flatten(pipeline.tree)["block_3/attention/out/kernel"].shape == (80, 160)
  assert result.metrics["size_bytes"] == 4 * _size(pipeline.tree) < 4 * _size(params) - 800_000
  masked = oneshot_prune(params, Pruner(ATTENTION, 0.5, structure=Heads(4)))
  expected = models.evaluate(model, masked, data.load_data_source(str(subset)))
  assert result.metrics["value"] == pytest.approx(expected, rel=1e-4)
  assert result.metrics["reference_value"] < result.metrics["value"] < 2 * expected
  out = tmp_path / "ckpt"
  save(out, pipeline.tree, model=pipeline.model_source, data=str(subset), recipe=recipe.raw)
  # A checkpoint names zoo data only; the user's own file is passed by the user.
  assert main(["eval", str(out), "--data", str(subset), "--json"]) == 0
  payload = json.loads(capsys.readouterr().out)
  assert payload["model"] == pipeline.model_source
  assert payload["value"] == pytest.approx(result.metrics["value"], rel=1e-4)
  assert payload["reference_value"] == pytest.approx(result.metrics["reference_value"], rel=1e-4)


def test_channel_shrink_records_model_source():
  model = models.get_model("digits-mlp")
  params = models.pretrained(model, progress=False)
  pruner = Pruner("dense1/kernel", 0.75, structure="channel")
  masked = oneshot_prune(params, pruner)
  masks = pruned_masks(masked, pruner)
  small, small_model = shrink_model(model, masked, masks)
  assert small_model.name == "digits-mlp(hidden1=64)"
  rebuilt = models.load_model(small_model.name)
  x = np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype(np.float32)
  np.testing.assert_allclose(
    np.asarray(rebuilt.apply(small, x)), np.asarray(model.apply(masked, x)), atol=1e-5
  )


def test_model_source_round_trip_and_bad_sources():
  assert parse_model_source("tiny-lm") == ("tiny-lm", {})
  source = model_source("tiny-lm", {"head_dim": 40, "layer_heads": [2, 3, 4, 1]})
  assert source == "tiny-lm(head_dim=40, layer_heads=(2, 3, 4, 1))"
  assert parse_model_source(source) == ("tiny-lm", {"head_dim": 40, "layer_heads": (2, 3, 4, 1)})
  assert model_source(source, {"layer_heads": (1, 1, 1, 1)}).endswith("layer_heads=(1, 1, 1, 1))")
  assert parse_model_source("pkg.mod:factory(hidden=8)") == ("pkg.mod:factory", {"hidden": 8})
  with pytest.raises(JaxshrinkError, match="must be `key=value` pairs with literal values"):
    models.load_model("tiny-lm(__import__('os').getcwd())")
  with pytest.raises(JaxshrinkError, match="must be `key=value` pairs"):
    models.load_model("tiny-lm(4)")
  with pytest.raises(JaxshrinkError, match=r"cannot be rebuilt with \{'heads': 2\}"):
    models.load_model("tiny-lm(heads=2)")


def _bert_like(num_layers=2, hidden=8, heads=4, seed=0):
  rng = np.random.default_rng(seed)
  layers = {}
  for index in range(num_layers):
    attention = {
      name: {"kernel": rng.normal(size=(hidden, hidden)).astype(np.float32),
             "bias": rng.normal(size=hidden).astype(np.float32)}
      for name in ("query", "key", "value", "output")
    }  # fmt: skip
    layers[f"layer_{index}"] = {
      "attention": attention,
      "output": {"kernel": rng.normal(size=(2 * hidden, hidden)).astype(np.float32)},
    }
  return {"encoder": layers}


def test_heads_generic_bert_naming():
  params = _bert_like()
  pruner = Pruner(".*attention/.*/kernel", 0.5, structure=Heads(4))
  masked = oneshot_prune(params, pruner)
  masks = pruned_masks(masked, pruner)
  small, kept, head_size = shrink_heads(masked, masks, Heads(4))
  assert kept == {"encoder/layer_0/attention": 2, "encoder/layer_1/attention": 2}
  assert head_size == 2
  attention = small["encoder"]["layer_1"]["attention"]
  assert attention["query"]["kernel"].shape == (8, 4) and attention["query"]["bias"].shape == (4,)
  assert attention["output"]["kernel"].shape == (4, 8) and attention["output"]["bias"].shape == (8,)
  # The feed-forward `output` of a layer is not an attention projection.
  np.testing.assert_array_equal(small["encoder"]["layer_0"]["output"]["kernel"],
                                params["encoder"]["layer_0"]["output"]["kernel"])  # fmt: skip
  # Attention math on the masked and the shrunk projections gives the same output.
  x = np.random.default_rng(1).normal(size=(3, 5, 8)).astype(np.float32)

  def attend(p, heads):
    a = p["encoder"]["layer_0"]["attention"]
    q, k, v = (x @ a[n]["kernel"] + a[n]["bias"] for n in ("query", "key", "value"))
    split = lambda t: t.reshape(3, 5, heads, 2)  # noqa: E731
    w = jax.nn.softmax(np.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / np.sqrt(2), axis=-1)
    mixed = np.einsum("bhqk,bkhd->bqhd", w, split(v)).reshape(3, 5, heads * 2)
    return mixed @ a["output"]["kernel"] + a["output"]["bias"]

  np.testing.assert_allclose(attend(small, 2), attend(masked, 4), rtol=1e-5, atol=1e-5)


def test_head_count_from_a_bert_config():
  import functools

  class Fake:
    module = functools.partial(bert.BertEncoder, bert.BertConfig(hidden_size=48, num_heads=12))
    name = "bert"

  assert model_heads(Fake()) == {"num_heads": 12}


def test_bert_encoder_head_shrink():
  """Runs once `BertConfig` takes `head_dim` and per-layer `layer_heads` (the fields a
  head-shrunk model is configured with); until then head pruning works but not the rebuild."""
  import dataclasses
  import functools

  fields = {f.name for f in dataclasses.fields(bert.BertConfig)}
  if not {"head_dim", "layer_heads"} <= fields:
    pytest.skip("BertConfig has no `head_dim` / `layer_heads` fields to rebuild a shrunk encoder")
  from jaxshrink.models.base import zoo_model

  config = bert.BertConfig(num_layers=2, hidden_size=16, num_heads=4, intermediate_size=32,
                           vocab_size=128, max_positions=8)  # fmt: skip
  model = zoo_model("bert-tiny", functools.partial(bert.BertEncoder, config), (8,), "int32",
                    "test encoder", data="digits", metric="cosine", train_steps=1,
                    learning_rate=1e-3, batch_size=1)  # fmt: skip
  params = model.init(jax.random.key(0))
  assert model_heads(model) == {"num_heads": 4}
  pruner = Pruner(ATTENTION, 0.5, structure=Heads(4))
  masked = oneshot_prune(params, pruner)
  masks = pruned_masks(masked, pruner)
  small, small_model = shrink_model(model, masked, masks, structure="heads")
  assert small_model.name == "bert-tiny(head_dim=4, layer_heads=(2, 2))"
  query = small["encoder"]["layer_1"]["attention"]["query"]["kernel"]
  assert query.shape == (16, 8)
  assert small["encoder"]["layer_1"]["attention"]["output"]["kernel"].shape == (8, 16)
  assert small["encoder"]["layer_1"]["output"]["kernel"].shape == (32, 16)
  tokens = np.array([[101, 5, 7, 9, 102, 0, 0, 0], [101, 3, 4, 102, 0, 0, 0, 0]], np.int32)
  np.testing.assert_allclose(
    np.asarray(small_model.apply(small, tokens)),
    np.asarray(model.apply(masked, tokens)),
    rtol=1e-5,
    atol=1e-6,
  )


def test_bad_head_input_names_the_leaf_and_the_fix(lm, head_pruned):
  model, params, _ = lm
  with pytest.raises(ValueError, match="exactly one of `num_heads`.*or `head_size`"):
    Heads()
  with pytest.raises(ValueError, match="positive int"):
    Heads(num_heads=0)
  with pytest.raises(ValueError, match=r"`block_0/attention/\w+/kernel` has 160 head features, "
                     r"not a multiple of head_size=48"):  # fmt: skip
    Pruner(ATTENTION, 0.5, structure=Heads(head_size=48)).masks(params)
  with pytest.raises(ValueError, match=r"`block_0/mlp/fc\d/kernel`.*not one.*'\.\*attention"):
    Pruner(r"block_0/.*/kernel", 0.5, structure=Heads(4)).masks(params)
  bert = _bert_like()
  with pytest.raises(ValueError, match=r"`encoder/layer_0/output/kernel` was selected.*no "
                     r"selected query/key/value kernel"):  # fmt: skip
    Pruner(r"encoder/layer_\d/output/kernel", 0.5, structure=Heads(4)).masks(bert)
  # Pruning only queries leaves the removed heads' values alive: shrinking would change outputs.
  queries = Pruner(r".*attention/query/kernel", 0.5, structure=Heads(4))
  masked = oneshot_prune(params, queries)
  masks = pruned_masks(masked, queries)
  with pytest.raises(ValueError, match=r"heads \[.*\] of `block_0/attention`.*Include the value"):
    shrink(model, masked, masks, structure="heads")
  with pytest.raises(ValueError, match="no head-pruned attention kernel"):
    shrink(model, params, jax.tree.map(lambda _: np.ones((), bool), params), structure="heads")
  mlp = models.get_model("digits-mlp")
  with pytest.raises(ValueError, match="no `num_heads` in its module or config"):
    shrink(mlp, params, head_pruned[1], structure="heads")
  with pytest.raises(ValueError, match="needs structure 'channel'.*or 'heads'; got 'N:M'"):
    shrink(model, params, head_pruned[1], structure="2:4")
