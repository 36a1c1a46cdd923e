"""Layers stacked by `nn.scan` (the usual LLM layout): a technique that cannot follow the
loop says so, naming the leaf and the primitive; none of them runs the layers in float
silently."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jaxshrink as js
from jaxshrink import JaxshrinkError
from jaxshrink.quant import LayerQuant, QuantSpec, qat_apply, quantized_apply
from jaxshrink.quant.serve import IntegerPathError, IntegerPathWarning
from jaxshrink.sparsity import Pruner, sparsegpt, wanda

STACKED = "ScanBlock_0/Dense_0/kernel"


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(16)(x)), None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16)(x)
    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x, _ = stack()(x, None)
    return nn.Dense(4)(x)


MODEL = Scanned()


@pytest.fixture(scope="module")
def variables():
  return MODEL.init(jax.random.key(0), jnp.ones((2, 8)))


@pytest.fixture(scope="module")
def batches():
  return [jax.random.normal(jax.random.key(i), (16, 8)) for i in range(2)]


CALIBRATED = {
  "ptq": lambda v, b: js.ptq(MODEL.apply, v, b, ".*kernel", QuantSpec(bits=8), activation_bits=8),
  "gptq": lambda v, b: js.gptq(MODEL.apply, v, b, ".*kernel", QuantSpec(bits=4)),
  "awq": lambda v, b: js.awq(MODEL.apply, v, b, ".*kernel", QuantSpec(bits=4)),
  "wanda": lambda v, b: wanda(MODEL.apply, v, b, Pruner(".*kernel", sparsity=0.5)),
  "sparsegpt": lambda v, b: sparsegpt(MODEL.apply, v, b, Pruner(".*kernel", sparsity=0.5)),
}


@pytest.mark.parametrize("method", list(CALIBRATED))
def test_calibrated_methods_name_the_scanned_leaf(variables, batches, method):
  with pytest.raises(JaxshrinkError, match=rf"`{STACKED}` \(through `scan`\).*unrolled"):
    CALIBRATED[method](variables, batches)


def test_calibrated_methods_run_when_the_stack_is_excluded(variables, batches):
  tree = js.ptq(
    MODEL.apply, variables, batches, "Dense_.*/kernel", QuantSpec(bits=8), activation_bits=8
  )
  assert isinstance(tree["params"]["Dense_0"]["kernel"], js.QArray)
  assert not isinstance(tree["params"]["ScanBlock_0"]["Dense_0"]["kernel"], js.QArray)


def test_qat_refuses_a_kernel_inside_scan(variables, batches):
  apply = qat_apply(MODEL.apply, ".*kernel", QuantSpec(bits=8))
  with pytest.raises(JaxshrinkError, match=rf"`{STACKED}`: it is used inside `scan`"):
    jax.jit(apply)(variables, batches[0])


def test_qat_runs_when_the_stack_is_excluded(variables, batches):
  apply = qat_apply(MODEL.apply, "Dense_.*/kernel", QuantSpec(bits=8))
  assert jax.jit(apply)(variables, batches[0]).shape == (16, 4)


def test_w8a8_serving_names_a_scanned_kernel(variables, batches):
  tree = js.quantize_params(variables, ".*kernel", LayerQuant(QuantSpec(bits=8), 8))
  with pytest.warns(IntegerPathWarning, match=rf"`{STACKED}`.*`scan`"):
    quantized_apply(MODEL.apply)(tree, batches[0])
  with pytest.raises(IntegerPathError, match=rf"`{STACKED}`.*`scan`"):
    quantized_apply(MODEL.apply, strict=True)(tree, batches[0])
