"""The public names: subpackages are never shadowed, each concept has one name, and the
names an exported function needs are exported beside it."""

import importlib
import inspect
import pkgutil
import types

import pytest

import jaxshrink
from jaxshrink import distill, quant, sparsity

MODULES = sorted(m.name for m in pkgutil.iter_modules(jaxshrink.__path__))


def test_every_module_is_found():
  assert {"data", "distill", "export", "lowrank", "models", "quant", "sparsity"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_no_module_is_shadowed_by_a_public_name(name):
  module = importlib.import_module(f"jaxshrink.{name}")
  assert isinstance(module, types.ModuleType)
  assert getattr(jaxshrink, name) is module


def test_distill_is_the_subpackage():
  import jaxshrink.distill.step as step_module  # resolves through `jaxshrink.distill`

  assert jaxshrink.distill is distill and inspect.ismodule(jaxshrink.distill)
  assert jaxshrink.distill.DistillLoss is jaxshrink.DistillLoss
  assert jaxshrink.distill.distill_step is jaxshrink.distill_step is step_module.distill_step
  assert inspect.isfunction(jaxshrink.distill.distill)  # the loop, under the subpackage


def test_quantization_counterparts_of_the_pruning_methods():
  from jaxshrink.quant.awq import awq as deep_awq
  from jaxshrink.quant.gptq import gptq as deep_gptq

  assert quant.gptq is deep_gptq and quant.awq is deep_awq
  assert jaxshrink.gptq is deep_gptq and jaxshrink.awq is deep_awq
  assert jaxshrink.wanda is sparsity.wanda and jaxshrink.sparsegpt is sparsity.sparsegpt
  # The pruning methods return the tree alone; their masks come back from one function.
  assert jaxshrink.pruned_masks is sparsity.pruned_masks


def test_types_the_exported_functions_take_are_exported():
  from jaxshrink.quant.ptq import LayerQuant
  from jaxshrink.sparsity.allocation import Pruner

  assert jaxshrink.Pruner is sparsity.Pruner is Pruner
  assert jaxshrink.LayerQuant is quant.LayerQuant is LayerQuant
  for fn in (jaxshrink.oneshot_prune, jaxshrink.wanda, jaxshrink.sparsegpt, jaxshrink.pruning):
    assert "pruner" in inspect.signature(fn).parameters, fn.__name__


def test_one_name_per_concept():
  assert not hasattr(jaxshrink, "convert") and not hasattr(quant, "convert")
  assert "quantize_params" in jaxshrink.__all__ and "convert" not in jaxshrink.__all__
  assert "distill" not in jaxshrink.__all__  # `jaxshrink.distill` is the subpackage
  values = [getattr(jaxshrink, name) for name in jaxshrink.__all__]
  assert len({id(v) for v in values}) == len(values), "two public names for one object"


def test_your_own_model_names():
  from jaxshrink import model, serving

  assert jaxshrink.Compressed is model.Compressed and jaxshrink.Linen is model.Linen
  assert jaxshrink.as_functional is model.as_functional
  assert jaxshrink.serve is serving.serve
  assert jaxshrink.distill.functional is model.functional  # one function, two addresses


def test_bad_values_raise_jaxshrink_errors():
  """No bare `raise ValueError(...)` / `raise TypeError(...)`: the library's own subclasses
  (`InvalidValueError`, `InvalidTypeError`, ...) are still ValueError/TypeError, and the CLI
  reports them in one line."""
  import ast
  from pathlib import Path

  bare = []
  for path in Path(jaxshrink.__file__).parent.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
        name = getattr(node.exc.func, "id", None)
        if name in ("ValueError", "TypeError"):
          bare.append(f"{path.name}:{node.lineno}")
  assert bare == []
