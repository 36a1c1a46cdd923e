"""Sequential calibration: blocks in forward order, each calibrated on the compressed blocks'
outputs; one pass stays available (`sequential: false`) and gives the old results."""

import numpy as np
import pytest

from jaxshrink import models, sequential
from jaxshrink.data import get_dataset
from jaxshrink.recipes import parse_recipe, prepare, run_stages
from jaxshrink.sequential import block_of, blocks
from jaxshrink.tree import flatten


def test_blocks_group_a_transformer_layer_and_follow_the_forward():
  model = models.get_model("tiny-lm")
  params = models.pretrained(model, progress=False)
  x = get_dataset(model.data).x_train[:1]
  kernels = [p for p, leaf in flatten(params).items() if p.endswith("kernel") and leaf.ndim >= 2]
  found = blocks(model.apply, params, x, sorted(kernels, reverse=True))
  assert [block_of(b[0]) for b in found] == [f"block_{i}" for i in range(4)] + ["head/kernel"]
  # Inside a block, the order the forward reads them: attention before the MLP.
  assert found[0][-2:] == ["block_0/mlp/fc1/kernel", "block_0/mlp/fc2/kernel"]
  assert sorted(p for b in found for p in b) == sorted(kernels)


@pytest.mark.parametrize(
  "path, block",
  [("encoder/layer_3/attention/query/kernel", "encoder/layer_3"), ("conv1/kernel", "conv1/kernel"),
   ("dense/kernel", "dense/kernel"), ("h_0/mlp/c_fc/kernel", "h_0")],
)  # fmt: skip
def test_block_of(path, block):
  assert block_of(path) == block


@pytest.fixture(scope="module")
def start():
  return prepare(parse_recipe({"model": "digits-cnn", "stages": []}), progress=False)


def _stage(pipeline, stage):
  return run_stages(parse_recipe({"model": "digits-cnn", "stages": [stage]}), pipeline)


@pytest.mark.parametrize(
  "stage",
  [
    {"quantize": {"method": "gptq", "weight_bits": 3, "group_size": 32, "calibration_batches": 2}},
    {"prune": {"method": "sparsegpt", "sparsity": 0.5, "calibration_batches": 2}},
  ],
)
def test_the_first_block_matches_one_pass_and_later_blocks_see_compressed_inputs(
  start, stage, monkeypatch
):
  # Whole batches, so the sums run in one pass's order and the first block matches bit for bit
  # (pieces are checked against whole batches in test_sequential_fit).
  monkeypatch.setattr(sequential, "PAIRED_EXAMPLES", 1 << 30)
  kind, options = next(iter(stage.items()))
  seq = flatten(_stage(start, stage).tree)
  one = flatten(_stage(start, {kind: {**options, "sequential": False}}).tree)
  decode = lambda leaf: np.asarray(leaf.materialize() if hasattr(leaf, "materialize") else leaf)  # noqa: E731
  # conv1 reads the input itself; dense1 reads what the compressed conv layers produce.
  first = "conv1/kernel" if kind == "quantize" else "conv2/kernel"
  np.testing.assert_array_equal(decode(seq[first]), decode(one[first]))
  assert not np.array_equal(decode(seq["dense1/kernel"]), decode(one["dense1/kernel"]))


def test_sequential_is_a_method_key_of_gptq_and_awq_only(start):
  from jaxshrink.errors import UsageError

  with pytest.raises(UsageError, match="`sequential: False` of `quantize` does not apply"):
    _stage(start, {"quantize": {"sequential": False}})
