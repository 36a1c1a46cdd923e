"""A linen model with `batch_stats`: calibrated methods run on its variable dict, the other
collections pass through untouched, and checkpoints keep every collection (nothing dropped)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxshrink as js
from jaxshrink import JaxshrinkError, capture
from jaxshrink.capture import collect
from jaxshrink.encoding import is_encoding
from jaxshrink.quant import QuantSpec, quantized_apply
from jaxshrink.sparsity import Pruner, wanda


class BatchNormMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(32)(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    return nn.Dense(4)(nn.relu(x))


MODEL = BatchNormMLP()


@pytest.fixture(scope="module")
def variables():
  v = MODEL.init(jax.random.key(0), jnp.ones((2, 16)))
  # Running statistics that differ from the init values, so dropping them would show.
  stats = jax.tree.map(lambda a: a + jnp.linspace(0.2, 0.9, a.shape[0]), v["batch_stats"])
  return {**v, "batch_stats": stats}


@pytest.fixture(scope="module")
def batches():
  return [jax.random.normal(jax.random.key(i), (64, 16)) for i in range(4)]


def _equal(a, b):
  return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))


def test_save_load_keeps_every_collection(variables, tmp_path):
  js.save(tmp_path / "ckpt", variables)
  back = js.load(tmp_path / "ckpt")
  assert set(back) == {"params", "batch_stats"}
  assert _equal(back, variables)
  paths = [leaf["path"] for leaf in js.read_manifest(tmp_path / "ckpt")["leaves"]]
  assert "batch_stats/BatchNorm_0/mean" in paths and "params/Dense_0/kernel" in paths


def test_plain_param_trees_keep_their_paths(variables, tmp_path):
  js.save(tmp_path / "p", variables["params"])
  paths = [leaf["path"] for leaf in js.read_manifest(tmp_path / "p")["leaves"]]
  assert "Dense_0/kernel" in paths and not any(p.startswith("params/") for p in paths)


@pytest.mark.parametrize("method", ["ptq-w8a8", "gptq-int4"])
def test_calibrated_quantization_runs_on_the_variable_dict(variables, batches, method, tmp_path):
  if method == "ptq-w8a8":
    tree = js.ptq(MODEL.apply, variables, batches, ".*kernel", QuantSpec(bits=8), activation_bits=8)
  else:
    tree = js.gptq(MODEL.apply, variables, batches, ".*kernel", QuantSpec(bits=4, group_size=8))
  assert _equal(tree["batch_stats"], variables["batch_stats"])
  kernels = [p for p, leaf in js.tree.flatten(tree).items() if is_encoding(leaf)]
  assert kernels == ["Dense_0/kernel", "Dense_1/kernel"]
  x = batches[0]
  reference = MODEL.apply(variables, x)
  out = jax.jit(quantized_apply(MODEL.apply))(tree, x)
  error = float(jnp.max(jnp.abs(out - reference)) / jnp.max(jnp.abs(reference)))
  assert error < (0.03 if method == "ptq-w8a8" else 0.15)
  js.save(tmp_path / "q", tree)  # the compressed tree round-trips with its statistics
  back = js.load(tmp_path / "q")
  np.testing.assert_array_equal(jax.jit(quantized_apply(MODEL.apply))(back, x), out)


def test_wanda_prunes_params_and_leaves_statistics(variables, batches):
  pruned = wanda(MODEL.apply, variables, batches, Pruner(".*kernel", sparsity=0.5))
  assert _equal(pruned["batch_stats"], variables["batch_stats"])
  kernel = pruned["params"]["Dense_0"]["kernel"]
  assert float(jnp.mean(kernel == 0)) == pytest.approx(0.5, abs=0.02)


def test_safetensors_round_trip_keeps_every_collection(variables, tmp_path):
  path = js.export_safetensors(variables, tmp_path / "m.safetensors")
  assert _equal(js.import_safetensors(path), variables)


def test_collect_on_a_compressed_kernel_names_the_leaf(variables, batches):
  tree = js.quantize_params(variables, ".*kernel", QuantSpec(bits=8))
  with pytest.raises(JaxshrinkError, match=r"Dense_0/kernel.* already compressed.*materialize"):
    collect(MODEL.apply, tree, batches, ".*kernel", {})


def test_collect_runs_the_compressed_model_around_the_selected_kernels(variables, batches):
  # Inputs of the second layer come from the first one's int4 codes, not its float weights.
  tree = js.quantize_params(variables, "Dense_0/kernel", QuantSpec(bits=4))
  stats = {"absmax": capture.absmax_reducer()}
  compressed = collect(MODEL.apply, tree, batches, "Dense_1/kernel", stats).stats
  decoded = collect(MODEL.apply, js.materialize(tree), batches, "Dense_1/kernel", stats).stats
  floats = collect(MODEL.apply, variables, batches, "Dense_1/kernel", stats).stats
  assert _equal(compressed, decoded)
  assert not _equal(compressed, floats)
