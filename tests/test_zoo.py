"""Tests for jaxshrink.models: zoo shapes and paths, purity under jit/grad, training, caching."""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
import uuid
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxshrink.models as models
from jaxshrink.data import Dataset, get_dataset
from jaxshrink.errors import JaxshrinkError
from jaxshrink.models import (
  ZooModel,
  evaluate,
  get_model,
  list_models,
  load_model,
  pretrained,
  pretrained_dir,
  train,
)

ALL_MODELS = ["digits-cnn", "digits-cnn-nnx", "digits-mlp", "digits-mlp-nnx", "tiny-lm"]
DIGITS_TWINS = [("digits-cnn", "digits-cnn-nnx"), ("digits-mlp", "digits-mlp-nnx")]


def leaf_paths(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """'a/b/kernel' -> (shape, dtype) for every leaf."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    "/".join(str(key.key) for key in path): (tuple(leaf.shape), str(leaf.dtype))
    for path, leaf in flat
  }


def assert_plain_dicts(tree):
  assert type(tree) is dict, type(tree)
  for key, value in tree.items():
    assert isinstance(key, str), key
    if not hasattr(value, "shape"):
      assert_plain_dicts(value)


def test_public_names():
  public = {
    name
    for name, value in vars(models).items()
    if not name.startswith("_") and not inspect.ismodule(value)
  }
  assert public == {
    "ZooModel", "cosine_similarity", "cross_entropy_loss", "embedding_metrics", "evaluate",
    "get_model", "linen_functions", "list_models", "load_model", "make_optimizer",
    "nnx_functions", "pretrained", "pretrained_dir", "task_loss", "train",
  }  # fmt: skip


def test_list_models():
  # minilm-l6 and its student (pretrained, not trained here) are tested in test_minilm.py, the
  # llamas in test_llama.py.
  others = [
    "digits-student", "digits-student-nnx", "llama-300m", "llama-tiny", "minilm-l3-student",
    "minilm-l6",
  ]  # fmt: skip
  assert list_models() == sorted([*ALL_MODELS, *others])


@pytest.mark.parametrize("name", ALL_MODELS)
def test_init_apply_shapes_and_dtypes(name):
  model = get_model(name)
  abstract = jax.eval_shape(model.init, jax.random.key(0))
  assert_plain_dicts(abstract)
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
  logits = jax.eval_shape(model.apply, abstract, model.input_spec(3))
  expected = (3, 10) if model.data == "digits" else (3, 64, 256)
  assert logits.shape == expected and logits.dtype == jnp.float32
  assert model.higher_is_better == (model.metric == "accuracy")
  assert model.framework == ("nnx" if name.endswith("-nnx") else "linen")


@pytest.mark.parametrize(("linen_name", "nnx_name"), DIGITS_TWINS)
def test_linen_and_nnx_twins_share_paths_and_function(linen_name, nnx_name):
  linen_model, nnx_model = get_model(linen_name), get_model(nnx_name)
  params = jax.jit(linen_model.init)(jax.random.key(1))
  assert leaf_paths(params) == leaf_paths(jax.eval_shape(nnx_model.init, jax.random.key(1)))
  # Same architecture and layout: Linen weights run unchanged in the NNX twin.
  # Batch 2, as in test_apply_under_jit_and_grad, so the compiled executables are shared.
  x = jax.random.uniform(jax.random.key(2), (2, 8, 8, 1), jnp.float32)
  np.testing.assert_allclose(
    jax.jit(nnx_model.apply)(params, x), jax.jit(linen_model.apply)(params, x), rtol=1e-5, atol=1e-5
  )


def test_readable_paths():
  cnn = leaf_paths(jax.eval_shape(get_model("digits-cnn").init, jax.random.key(0)))
  assert cnn["conv2/kernel"] == ((3, 3, 32, 64), "float32")
  assert cnn["dense1/kernel"] == ((1024, 128), "float32")
  lm = leaf_paths(jax.eval_shape(get_model("tiny-lm").init, jax.random.key(0)))
  for path in (
    "embed/embedding", "pos_embed/embedding", "block_0/ln1/scale",
    "block_0/attention/query/kernel", "block_0/attention/key/kernel",
    "block_0/attention/value/kernel", "block_0/attention/out/kernel", "block_3/mlp/fc1/kernel",
    "block_3/mlp/fc2/kernel", "ln_final/scale", "head/kernel",
  ):  # fmt: skip
    assert path in lm, sorted(lm)
  assert lm["block_0/mlp/fc1/kernel"] == ((160, 640), "float32")
  assert lm["head/kernel"] == ((160, 256), "float32")
  num_params = sum(int(np.prod(shape)) for shape, _ in lm.values())
  assert 1_000_000 < num_params < 5_000_000


@pytest.fixture(scope="module")
def tiny_lm_params():
  return jax.jit(get_model("tiny-lm").init)(jax.random.key(0))


# tiny-lm is left out: compiling its gradient is the slowest thing in this file, and
# test_tiny_lm_few_steps_reduce_loss already runs its jitted value_and_grad through `train`.
@pytest.mark.parametrize("name", [name for name in ALL_MODELS if name != "tiny-lm"])
def test_apply_under_jit_and_grad(name):
  model = get_model(name)
  params = jax.jit(model.init)(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1), jnp.float32)
  eager = model.apply(params, x)
  np.testing.assert_allclose(jax.jit(model.apply)(params, x), eager, rtol=1e-4, atol=1e-4)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(model.apply(p, x) ** 2)))(params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_nnx_apply_is_pure():
  model = get_model("digits-mlp-nnx")
  first, second = jax.jit(model.init)(jax.random.key(0)), jax.jit(model.init)(jax.random.key(1))
  x = jnp.ones((2, 8, 8, 1), jnp.float32)
  out_first = model.apply(first, x)
  model.apply(second, x)  # must not leave `second` behind in shared state
  np.testing.assert_array_equal(model.apply(first, x), out_first)
  assert not np.allclose(model.apply(second, x), out_first)


def test_init_is_deterministic_per_key():
  model = get_model("digits-mlp-nnx")
  init = jax.jit(model.init)
  a, b = init(jax.random.key(3)), init(jax.random.key(3))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  other = init(jax.random.key(4))
  assert not np.array_equal(a["dense1"]["kernel"], other["dense1"]["kernel"])


def test_tiny_lm_is_causal_and_checks_length(tiny_lm_params):
  model, params = get_model("tiny-lm"), tiny_lm_params
  tokens = jax.random.randint(jax.random.key(1), (1, 64), 0, 256, jnp.int32)
  changed = tokens.at[0, 40].set((tokens[0, 40] + 1) % 256)
  apply = jax.jit(model.apply)
  before, after = apply(params, tokens), apply(params, changed)
  np.testing.assert_array_equal(before[:, :40], after[:, :40])
  assert not np.allclose(before[:, 40:], after[:, 40:])
  assert jax.eval_shape(model.apply, params, tokens[:, :16]).shape == (1, 16, 256)
  with pytest.raises(ValueError, match="length 65 but the model has 64 positions"):
    model.apply(params, jnp.zeros((1, 65), jnp.int32))


def test_dot_general_hook_reaches_every_dense(tiny_lm_params):
  calls = []

  def counting_dot_general(lhs, rhs, dimension_numbers, *args, **kwargs):
    calls.append(rhs.shape)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, *args, **kwargs)

  model, params = get_model("tiny-lm"), tiny_lm_params
  hooked = model.module.clone(dot_general=counting_dot_general)
  tokens = jnp.zeros((1, 8), jnp.int32)
  out = hooked.apply({"params": params}, tokens)
  np.testing.assert_allclose(out, model.apply(params, tokens), rtol=1e-6)
  assert len(calls) == 4 * 6 + 1  # q, k, v, out, fc1, fc2 per block + head


def test_unknown_model_lists_valid_names():
  with pytest.raises(JaxshrinkError, match=r"unknown model 'resnet'.*'digits-cnn'.*'tiny-lm'"):
    get_model("resnet")
  with pytest.raises(JaxshrinkError, match="unknown model 'resnet'"):
    load_model("resnet")


def test_load_model_factory(tmp_path, monkeypatch):
  module = f"user_models_{uuid.uuid4().hex[:8]}"
  (tmp_path / f"{module}.py").write_text(
    "import dataclasses\n"
    "from jaxshrink.models import get_model\n"
    "def make():\n  return dataclasses.replace(get_model('digits-mlp'), name='my-mlp')\n"
    "def wrong():\n  return 'not a model'\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  assert load_model("digits-cnn") is get_model("digits-cnn")
  assert load_model(f"{module}:make").name == "my-mlp"
  with pytest.raises(TypeError, match=rf"'{module}:wrong' must return .*ZooModel; got str"):
    load_model(f"{module}:wrong")


def test_zoo_model_validation():
  model = get_model("digits-mlp")
  with pytest.raises(ValueError, match="`metric` must be one of"):
    dataclasses.replace(model, metric="f1")
  with pytest.raises(ValueError, match="`framework` must be one of"):
    dataclasses.replace(model, framework="haiku")


def test_evaluate_is_batch_size_independent_and_checks_data():
  model = get_model("digits-mlp")
  params = jax.jit(model.init)(jax.random.key(0))
  digits = get_dataset("digits")
  full = evaluate(model, params, digits)
  assert 0.0 <= full <= 1.0
  assert evaluate(model, params, digits, batch_size=7) == pytest.approx(full, abs=1e-12)
  with pytest.raises(JaxshrinkError, match=r"returns logits of shape \(10,\) per example"):
    evaluate(model, params, get_dataset("stdlib-text"))
  lm = get_model("tiny-lm")
  with pytest.raises(JaxshrinkError, match=r"'tiny-lm' cannot take inputs of shape \(8, 8, 1\)"):
    evaluate(lm, jax.eval_shape(lm.init, jax.random.key(0)), digits)
  with pytest.raises(ValueError, match="`split` must be 'train' or 'test'"):
    evaluate(model, params, digits, split="val")


def small_lm_dataset() -> Dataset:
  full = get_dataset("stdlib-text")
  return Dataset(
    "stdlib-text-small", "language-model", full.x_train[:512], full.y_train[:512],
    full.x_test[:64], full.y_test[:64], num_classes=256,
  )  # fmt: skip


def test_tiny_lm_few_steps_reduce_loss(tiny_lm_params):
  model = dataclasses.replace(get_model("tiny-lm"), batch_size=8)
  data = small_lm_dataset()
  before = evaluate(model, tiny_lm_params, data)
  assert 256 < before < 1000  # near-uniform over 256 bytes at init (exactly 256 if uniform)
  params = train(model, data, steps=20, progress=False)
  assert jax.tree.structure(params) == jax.tree.structure(tiny_lm_params)
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(params))
  after = evaluate(model, params, data)
  assert after < 0.5 * before


def test_train_needs_a_training_split():
  full = get_dataset("digits")
  empty = Dataset(
    "no-train", "classification", full.x_train[:0], full.y_train[:0], full.x_test,
    full.y_test, num_classes=10,
  )  # fmt: skip
  with pytest.raises(JaxshrinkError, match="has no train examples"):
    train(get_model("digits-mlp"), empty, steps=1, progress=False)


# --- pretrained cache ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained_cnn():
  return pretrained("digits-cnn", progress=False)


def test_pretrained_digits_cnn_accuracy_and_cache(pretrained_cnn):
  model = get_model("digits-cnn")
  assert evaluate(model, pretrained_cnn, get_dataset("digits")) >= 0.97
  meta = json.loads((pretrained_dir("digits-cnn") / "meta.json").read_text())
  assert meta["name"] == "digits-cnn" and meta["test_score"] >= 0.97
  start = time.perf_counter()
  again = pretrained("digits-cnn", progress=False)
  assert time.perf_counter() - start < 10.0  # loaded, not retrained (training takes ~20 s)
  jax.tree.map(np.testing.assert_array_equal, again, pretrained_cnn)


def test_pretrained_retrains_corrupt_entries_and_keeps_one_entry_per_recipe(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXSHRINK_CACHE", str(tmp_path))
  model = dataclasses.replace(get_model("digits-mlp"), name="tiny-test-mlp", train_steps=3)
  first = pretrained(model, progress=False)
  entry = pretrained_dir(model)
  assert entry.parent == tmp_path / "zoo" and entry.name.startswith("tiny-test-mlp-v1-")
  # The entry and no leftover temporary directories (the lock file may stay).
  assert [p.name for p in entry.parent.iterdir() if p.is_dir()] == [entry.name]
  for path in (entry / "params").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  with pytest.warns(RuntimeWarning, match="could not be loaded.*retraining"):
    second = pretrained(model, progress=False)
  jax.tree.map(np.testing.assert_array_equal, first, second)
  third = pretrained(model, progress=False)  # the rewritten entry loads cleanly
  jax.tree.map(np.testing.assert_array_equal, first, third)

  # Another recipe under the same name trains into its own entry; the first one stays and
  # loads again without training.
  longer = dataclasses.replace(model, train_steps=4)
  pretrained(longer, progress=False)
  assert pretrained_dir(longer) != entry
  assert json.loads((pretrained_dir(longer) / "meta.json").read_text())["recipe"]["steps"] == 4
  assert json.loads((entry / "meta.json").read_text())["recipe"]["steps"] == 3
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.tree.map(np.testing.assert_array_equal, first, pretrained(model, progress=False))


def test_pretrained_leaves_a_directory_it_did_not_write(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXSHRINK_CACHE", str(tmp_path))
  model = dataclasses.replace(get_model("digits-mlp"), name="tiny-test-mlp", train_steps=3)
  entry = pretrained_dir(model)
  entry.mkdir(parents=True)
  (entry / "notes.txt").write_text("mine")
  with pytest.raises(JaxshrinkError, match="not a cache entry this library wrote.*notes.txt"):
    pretrained(model, progress=False)
  assert (entry / "notes.txt").read_text() == "mine"


def test_pretrained_rejects_wrong_type():
  with pytest.raises(TypeError, match="`name_or_model` must be a zoo model name or a ZooModel"):
    pretrained(3)
  assert isinstance(get_model("digits-cnn"), ZooModel)


def test_zoo_cache_is_keyed_by_the_data(monkeypatch):
  # A new corpus or tokenizer (a version bump, another Python's docstrings) must retrain: weights
  # cached for the old token ids would otherwise load and score garbage on the new ones.
  import importlib

  from jaxshrink.data.registry import dataset_key

  module = importlib.import_module("jaxshrink.models.pretrained")

  model = models.get_model("llama-tiny")
  abstract = jax.eval_shape(model.init, jax.random.key(0))
  recipe = module._recipe(model, abstract)
  assert recipe["data_key"] == dataset_key("corpus-bpe") and "4096" in recipe["data_key"]
  monkeypatch.setattr(module, "dataset_key", lambda name: "another-corpus")
  assert module._recipe(model, abstract) != recipe
