"""Models rebuilt with other sizes: `"tiny-lm(head_dim=40, layer_heads=(2, 2, 2, 2))"`.

A model source is a zoo name or `"package.module:factory"`, optionally followed by keyword
overrides in call syntax. The overrides are constructor fields of the model's module: a Linen
module is `clone`d with them; an NNX module class gets them as keywords, or, when it was bound
to a config dataclass (`functools.partial(BertEncoder, config)`), they replace that config's
fields. Structured shrinking records the smaller sizes this way, so a checkpoint's manifest
names a model `jaxshrink eval` can rebuild. Values are Python literals only (`ast.literal_eval`),
so a manifest cannot run code through its model source.

>>> name, overrides = parse_model_source("digits-cnn(channels1=8, hidden=64)")
>>> name, overrides
('digits-cnn', {'channels1': 8, 'hidden': 64})
>>> model_source("digits-cnn", overrides)
'digits-cnn(channels1=8, hidden=64)'
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

from jaxshrink.errors import InvalidValueError, JaxshrinkError
from jaxshrink.models.base import ZooModel, linen_functions, nnx_functions

_SOURCE = re.compile(r"(?P<base>[^()]+)\((?P<args>.*)\)", re.DOTALL)


def parse_model_source(source: str) -> tuple[str, dict[str, Any]]:
  """Splits `"name(key=value, ...)"` into the base source and its overrides.

  Args:
    source: a model source, with or without overrides.

  Returns:
    `(base source, {field: literal value})`; the overrides are empty without parentheses.

  Raises:
    JaxshrinkError: when the overrides are not `key=literal` pairs.
  """
  match = _SOURCE.fullmatch(source.strip())
  if match is None:
    return source, {}
  base, args = match.group("base").strip(), match.group("args")
  try:
    call = ast.parse(f"f({args})", mode="eval").body
    if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
      raise InvalidValueError("only key=value pairs")
    overrides = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
  except (SyntaxError, ValueError) as e:
    raise JaxshrinkError(
      f"model source {source!r}: the part in parentheses must be `key=value` pairs with literal "
      f"values, e.g. 'tiny-lm(head_dim=40, layer_heads=(2, 2, 2, 2))' ({e})."
    ) from None
  # Lists read back from JSON-like text become tuples: module fields must be hashable.
  return base, {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}


def model_source(source: str, overrides: Mapping[str, Any]) -> str:
  """`source` with `overrides` added to (or replacing) the ones it already carries."""
  base, current = parse_model_source(source)
  merged = {**current, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}}
  if not merged:
    return base
  args = ", ".join(f"{k}={v!r}" for k, v in merged.items())
  return f"{base}({args})"


def _takes(config: Any, overrides: dict[str, Any]) -> bool:
  return dataclasses.is_dataclass(config) and set(overrides) <= {
    f.name for f in dataclasses.fields(config)
  }


def _nnx_module(module: Any, overrides: dict[str, Any]) -> Any:
  """An NNX constructor with `overrides`: in its bound config dataclass if it has one."""
  if isinstance(module, functools.partial):
    args, keywords = list(module.args), dict(module.keywords)
    for index, arg in enumerate(args):
      if _takes(arg, overrides):
        args[index] = dataclasses.replace(arg, **overrides)
        return functools.partial(module.func, *args, **keywords)
    for key, arg in keywords.items():
      if _takes(arg, overrides):
        keywords[key] = dataclasses.replace(arg, **overrides)
        return functools.partial(module.func, *args, **keywords)
  return functools.partial(module, **overrides)


def configure_model(model: ZooModel, overrides: Mapping[str, Any], *, name: str = "") -> ZooModel:
  """`model` rebuilt with other constructor fields (e.g. fewer channels or heads).

  Args:
    model: a `ZooModel` whose `module` is a Linen instance or an NNX class / partial.
    overrides: `{field: value}` for the module (or its config dataclass).
    name: the new model's name; default: its source with the overrides.

  Returns:
    A `ZooModel` with the same recipe and new `init`/`apply`/`module`.

  Raises:
    JaxshrinkError: when the module does not take one of the fields.
  """
  overrides = dict(overrides)
  base, current = parse_model_source(model.name)
  name = name or model_source(base, {**current, **overrides})
  if not overrides:
    return model
  try:
    if model.framework == "linen":
      module = model.module.clone(**overrides)
      init, apply = linen_functions(module, model.input_shape, model.input_dtype)
    else:
      module = _nnx_module(model.module, overrides)
      init, apply = nnx_functions(module)
  except TypeError as e:
    raise JaxshrinkError(
      f"model {model.name!r} cannot be rebuilt with {overrides}: {e}. Give only fields its "
      "module (or config) takes."
    ) from None
  return dataclasses.replace(model, name=name, init=init, apply=apply, module=module)


def load_configured(source: str, load: Any) -> ZooModel:
  """The model named by `source`, loading its base with `load` and applying the overrides."""
  base, overrides = parse_model_source(source)
  return configure_model(load(base), overrides, name=source if overrides else "")
