"""Named zoo models: `get_model("digits-cnn")`, `list_models()`, `load_model(source)`.

`load_model` is for sources the user types (recipes, flags): it may import their
`module:factory`. A source read from a checkpoint is untrusted and goes through
`checkpoint_model`, which accepts zoo names with literal overrides only and never imports.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from jaxshrink.data.sources import import_factory
from jaxshrink.errors import CheckpointError, JaxshrinkError
from jaxshrink.models.base import ZooModel
from jaxshrink.models.cnn import digits_cnn, digits_cnn_nnx
from jaxshrink.models.minilm import minilm_l6
from jaxshrink.models.mlp import digits_mlp, digits_mlp_nnx
from jaxshrink.models.student import digits_student, digits_student_nnx
from jaxshrink.models.transformer import tiny_lm

_MODEL_FACTORIES: dict[str, Callable[[], ZooModel]] = {
  "digits-cnn": digits_cnn,
  "digits-cnn-nnx": digits_cnn_nnx,
  "digits-mlp": digits_mlp,
  "digits-mlp-nnx": digits_mlp_nnx,
  "digits-student": digits_student,
  "digits-student-nnx": digits_student_nnx,
  "minilm-l6": minilm_l6,
  "tiny-lm": tiny_lm,
}


def list_models() -> list[str]:
  """Names accepted by `get_model`, sorted.

  >>> list_models()[:4]
  ['digits-cnn', 'digits-cnn-nnx', 'digits-mlp', 'digits-mlp-nnx']
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


def checkpoint_model(source: object, *, field: str, where: str, flag: str = "--model") -> ZooModel:
  """The model a checkpoint's manifest names: a zoo name, with literal size overrides only.

  A checkpoint is untrusted input, so nothing it names is imported: `module:factory` sources
  (and anything else that is not a zoo name) are refused. Overrides such as
  `tiny-lm(head_dim=40)` are parsed with `ast.literal_eval` only.

  Args:
    source: the manifest value (any JSON type).
    field: the manifest field it came from, e.g. `model` or `recipe.model`, for the message.
    where: the checkpoint, for the message.
    flag: the CLI flag through which the user can give the model instead.

  Raises:
    CheckpointError: one line naming the field, the value and the fix; nothing was imported.

  >>> checkpoint_model("tiny-lm(head_dim=40)", field="model", where="ckpt").name
  'tiny-lm(head_dim=40)'
  """
  from jaxshrink.models.configured import configure_model, parse_model_source

  fix = (
    f"A checkpoint may name only a zoo model ({', '.join(list_models())}, optionally with "
    "literal size overrides), never code to import, so nothing was loaded. Give the model "
    f"yourself: `{flag} module:factory` on the command line, or pass your model in Python."
  )
  if not isinstance(source, str):
    raise CheckpointError(f"`{where}`: manifest field `{field}` is {source!r}, not a string. {fix}")
  try:
    base, overrides = parse_model_source(source)
  except JaxshrinkError as e:
    raise CheckpointError(f"`{where}`: manifest field `{field}`: {e} {fix}") from None
  if base not in _MODEL_FACTORIES:
    raise CheckpointError(f"`{where}`: manifest field `{field}` names {source!r}. {fix}")
  try:
    return configure_model(get_model(base), overrides, name=source if overrides else "")
  except JaxshrinkError as e:
    raise CheckpointError(f"`{where}`: manifest field `{field}`: {e}") from None
