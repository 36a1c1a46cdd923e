"""Named zoo models: `get_model("digits-cnn")`, `list_models()`, `load_model(source)`."""

from __future__ import annotations

import functools
from collections.abc import Callable

from jaxshrink.data.sources import import_factory
from jaxshrink.errors import JaxshrinkError
from jaxshrink.models.base import ZooModel
from jaxshrink.models.cnn import digits_cnn, digits_cnn_nnx
from jaxshrink.models.minilm import minilm_l6
from jaxshrink.models.mlp import digits_mlp, digits_mlp_nnx
from jaxshrink.models.transformer import tiny_lm

_MODEL_FACTORIES: dict[str, Callable[[], ZooModel]] = {
  "digits-cnn": digits_cnn,
  "digits-cnn-nnx": digits_cnn_nnx,
  "digits-mlp": digits_mlp,
  "digits-mlp-nnx": digits_mlp_nnx,
  "minilm-l6": minilm_l6,
  "tiny-lm": tiny_lm,
}


def list_models() -> list[str]:
  """Names accepted by `get_model`, sorted.

  >>> list_models()
  ['digits-cnn', 'digits-cnn-nnx', 'digits-mlp', 'digits-mlp-nnx', 'minilm-l6', 'tiny-lm']
  """
  return sorted(_MODEL_FACTORIES)


# One instance per name and process: `apply` keeps its identity, so jitted training/evaluation
# functions keyed on it are compiled once.
@functools.cache
def get_model(name: str) -> ZooModel:
  """Returns the named zoo model (untrained; see `pretrained` for weights).

  Raises:
    JaxshrinkError: for an unknown name; the message lists the valid names.

  >>> get_model("tiny-lm").metric
  'perplexity'
  """
  if name not in _MODEL_FACTORIES:
    raise JaxshrinkError(
      f"unknown model {name!r}; valid names are {list_models()}. Pass one of those, or your own "
      f"model as 'package.module:factory' returning a ZooModel."
    )
  return _MODEL_FACTORIES[name]()


def load_model(source: str) -> ZooModel:
  """Loads a model from a zoo name or a `"package.module:factory"` reference.

  Args:
    source: a name from `list_models()`, or `"package.module:factory"` where `factory()` returns
      a `ZooModel`; either may end in `(field=value, ...)` overrides of the module's sizes
      (`jaxshrink.models.configured`).

  Raises:
    JaxshrinkError: for an unknown name or an unimportable factory.
    TypeError: when the factory returns something other than a `ZooModel`.
  """
  if not isinstance(source, str):
    raise TypeError(f"`source` must be a str; got {type(source).__name__}.")
  if source.rstrip().endswith(")"):  # "tiny-lm(layer_heads=(2, 2, 2, 2))": a shrunk model
    from jaxshrink.models.configured import load_configured

    return load_configured(source, load_model)
  if source in _MODEL_FACTORIES:
    return get_model(source)
  if ":" in source:
    model = import_factory(source)
    if not isinstance(model, ZooModel):
      raise TypeError(
        f"model factory {source!r} must return a jaxshrink.models.ZooModel; got "
        f"{type(model).__name__}."
      )
    return model
  return get_model(source)  # raises the unknown-name error with the valid names
