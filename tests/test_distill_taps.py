"""`tapped_apply` (submodule outputs of NNX and Linen zoo models) and the distill stage's
hidden-state `features`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxshrink.distill.stage  # noqa: F401  (registers `distill`)
from jaxshrink import models
from jaxshrink.distill.stage import feature_pairs
from jaxshrink.distill.taps import tapped_apply
from jaxshrink.errors import JaxshrinkError, UsageError
from jaxshrink.recipes import parse_recipe, run_recipe


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 1)), jnp.float32)


@pytest.mark.parametrize("name", ["digits-cnn", "digits-cnn-nnx"])
def test_tap_returns_the_submodule_output_and_the_same_logits(name, images):
  model = models.get_model(name)
  params = model.init(jax.random.key(1))
  out = jax.jit(tapped_apply(model, {"h": "dense1", "last": "/dense2/"}))(params, images)
  np.testing.assert_array_equal(out["logits"], model.apply(params, images))
  np.testing.assert_array_equal(out["last"], out["logits"])  # dense2 is the output layer
  # dense2(relu(h)) reproduces the logits: `h` is dense1's pre-activation output.
  kernel, bias = params["dense2"]["kernel"], params["dense2"]["bias"]
  np.testing.assert_allclose(jax.nn.relu(out["h"]) @ kernel + bias, out["logits"], atol=1e-5)
  assert out["h"].shape == (3, 128)


def test_tap_works_under_grad(images):
  model = models.get_model("digits-cnn-nnx")
  params = model.init(jax.random.key(1))
  apply = tapped_apply(model, {"h": "dense1"})
  grads = jax.grad(lambda p: jnp.sum(apply(p, images)["h"] ** 2))(params)
  assert float(jnp.abs(grads["dense1"]["kernel"]).sum()) > 0
  assert float(jnp.abs(grads["dense2"]["kernel"]).sum()) == 0.0  # after the tap


def test_pad_id_zeroes_padding_positions():
  from jaxshrink.distill.taps import _mask_tokens

  tokens = jnp.array([[5, 7, 0], [3, 0, 0]], jnp.int32)
  value = jnp.ones((2, 3, 4))
  masked = _mask_tokens(value, tokens, 0)
  np.testing.assert_array_equal(masked.sum(-1), [[4, 4, 0], [4, 0, 0]])
  np.testing.assert_array_equal(_mask_tokens(value, tokens, None), value)
  np.testing.assert_array_equal(_mask_tokens(jnp.ones((2, 4)), tokens, 0), jnp.ones((2, 4)))


@pytest.mark.parametrize("name", ["digits-cnn", "digits-cnn-nnx"])
def test_bad_taps(name, images):
  model = models.get_model(name)
  params = model.init(jax.random.key(1))
  with pytest.raises(JaxshrinkError, match="no submodule `dense9`.*encoder/layer_2"):
    tapped_apply(model, {"h": "dense9"}, who="student")(params, images)
  with pytest.raises(ValueError, match="`logits` is reserved"):
    tapped_apply(model, {"logits": "dense1"})
  with pytest.raises(ValueError, match="needs a module path"):
    tapped_apply(model, {"h": "/"})


def test_feature_pairs_from_options():
  pairs = feature_pairs([{"student": "hidden", "teacher": "dense1", "weight": 0.5},
                         {"student": "out", "teacher": "dense2", "kind": "cosine"}])  # fmt: skip
  assert [(p.student, p.teacher, p.kind, p.weight) for p in pairs] == [
    ("s:hidden", "t:dense1", "mse", 0.5),
    ("s:out", "t:dense2", "cosine", 1.0),
  ]
  for bad, match in [
    ({"student": "a"}, "needs `teacher`"),
    ({"student": "a", "teacher": "b", "kind": "l1"}, "`kind` .* must be one of"),
    ({"student": "a", "teacher": "b", "weight": -1}, "`weight` .* >= 0"),
    ({"student": "a", "teacher": "b", "layer": 1}, r"Unknown key\(s\) \['layer'\]"),
    ("a->b", "must be a mapping"),
  ]:
    with pytest.raises(UsageError, match=match):
      feature_pairs([bad])
  with pytest.raises(UsageError, match="must be a list"):
    feature_pairs({"student": "a"})


def test_recipe_distills_hidden_states_through_a_projection():
  """Student `hidden` (128 wide) learns to match the CNN's `dense1` (128) plus KD."""
  stage = {"student": "jaxshrink.distill.models:digits_student", "steps": 150,
           "losses": {"kd": 1.0},
           "features": [{"student": "hidden", "teacher": "dense1", "weight": 0.05}]}  # fmt: skip
  result = run_recipe(parse_recipe({"model": "digits-cnn", "stages": [{"distill": stage}]}),
                      progress=False)  # fmt: skip
  assert result.pipeline.model.name == "digits-student"
  # The stored student is the plain model again: its apply returns logits.
  assert result.pipeline.model.apply(result.pipeline.tree, jnp.zeros((1, 8, 8, 1))).shape == (1, 10)
  assert result.metrics["value"] > 0.85


def test_recipe_rejects_bad_distill_options():
  stage = {"student": "jaxshrink.distill.models:digits_student", "steps": 1}
  for extra, match in [
    ({"learning_rate": "1e-9"}, "number > 0 .*YAML needs a dot"),
    ({"pad_id": "0"}, "`pad_id` .* null or a token id"),
    ({"losses": {"hidden": 1.0}}, "Hidden-state losses go in `features`"),
  ]:
    recipe = parse_recipe({"model": "digits-cnn", "stages": [{"distill": {**stage, **extra}}]})
    with pytest.raises(UsageError, match=match):
      run_recipe(recipe, progress=False)
