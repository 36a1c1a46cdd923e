"""Named zoo models: `get_model("digits-cnn")`, `list_models()`, `load_model(source)`.

`load_model` is for sources the user types (recipes, flags): it may import their
`module:factory`. A source read from a checkpoint is untrusted and goes through
`checkpoint_model`, which accepts zoo names with literal overrides only and never imports.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from jaxshrink.data.sources import import_factory, import_object
from jaxshrink.errors import CheckpointError, InvalidTypeError, JaxshrinkError, UsageError
from jaxshrink.models.base import HF_PREFIX, METRICS, ZooModel, user_model
from jaxshrink.models.cnn import digits_cnn, digits_cnn_nnx
from jaxshrink.models.llama_zoo import llama_300m, llama_tiny
from jaxshrink.models.minilm import minilm_l3_student, minilm_l6
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
  "llama-300m": llama_300m,
  "llama-tiny": llama_tiny,
  "minilm-l3-student": minilm_l3_student,
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
      f"model as 'package.module:factory' returning an nnx module, a (linen module, "
      f"variables) pair, an (apply, params) pair or a ZooModel."
    )
  return _MODEL_FACTORIES[name]()


def load_model(source: str, *, training: dict[str, Any] | None = None) -> ZooModel:
  """Loads a model from a zoo name or a `"package.module:factory"` reference.

  Args:
    source: a name from `list_models()`, `"hf:PATH"` for a Hugging Face Llama or BERT
      directory (`jaxshrink.interop.hf.from_hf`), or `"package.module:factory"` where
      `factory()` returns a `ZooModel` or your own model with its weights: an `nnx.Module`
      instance, a `(linen module, variables)` pair (or `jaxshrink.model.Linen`), an `(apply,
      params)` pair (`base.user_model`). A zoo name or a ZooModel factory may end in
      `(field=value, ...)` overrides of the module's sizes (`jaxshrink.models.configured`).
    training: training fields of your own model (`user_model`); a zoo model has its own.

  Raises:
    JaxshrinkError: for an unknown name or an unimportable factory.
    TypeError: when the factory returns none of those forms.
  """
  if not isinstance(source, str):
    raise InvalidTypeError(f"`source` must be a str; got {type(source).__name__}.")
  if source.startswith(HF_PREFIX):  # "hf:out/llama-hf": a Hugging Face directory (data only)
    from jaxshrink.interop.hf import from_hf

    return from_hf(source[len(HF_PREFIX) :])
  if source.rstrip().endswith(")"):  # "tiny-lm(layer_heads=(2, 2, 2, 2))": a shrunk model
    from jaxshrink.models.configured import load_configured

    return load_configured(source, load_model)
  if source in _MODEL_FACTORIES:
    return get_model(source)
  if ":" in source:
    return user_model(import_factory(source), name=source, training=training)
  return get_model(source)  # raises the unknown-name error with the valid names


def checkpoint_model(source: object, *, field: str, where: str, flag: str = "--model") -> ZooModel:
  """The model a checkpoint's manifest names: a zoo name, with literal size overrides only.

  A checkpoint is untrusted input, so nothing it names is imported: `module:factory` sources
  (and anything else that is not a zoo name or a Hugging Face directory, `hf:PATH`, whose
  config.json is read as data) are refused. Overrides such as
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
  if source.startswith(HF_PREFIX):  # a config.json and tensors: data, never code
    from jaxshrink.interop.hf import from_hf

    try:
      return from_hf(source[len(HF_PREFIX) :])
    except JaxshrinkError as e:
      raise CheckpointError(
        f"`{where}`: manifest field `{field}` names {source!r}, which cannot be read ({e}). "
        f"Give the model yourself with `{flag}`."
      ) from None
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


def load_metric(source: Any, *, higher_is_better: bool | None = None) -> dict[str, Any]:
  """A metric the user names (recipe `metric:`, `eval --metric`); it may import their code.

  Args:
    source: a built-in metric (`accuracy`, `perplexity`, `cosine`), or `"pkg.mod:fn"` naming
      `fn(outputs, labels) -> float` (called once on the whole test split's outputs and
      labels), or a mapping `{fn: "pkg.mod:fn", higher_is_better: bool}`.
    higher_is_better: the direction, when `source` does not give it; a function may carry it
      as its attribute `fn.higher_is_better`.

  Returns:
    The `ZooModel` fields it sets: `metric` (its name), and for a user metric `metric_fn` and
    `metric_higher_is_better`.

  Raises:
    UsageError: a malformed source, or a user metric whose direction nothing gives.
    JaxshrinkError: an unimportable function.

  >>> load_metric("my.metrics:agreement")["metric_higher_is_better"]
  True
  """
  if isinstance(source, dict):
    unknown = sorted(set(source) - {"fn", "higher_is_better"})
    if unknown or "fn" not in source:
      raise UsageError(
        f"`metric` as a mapping takes `fn` (required) and `higher_is_better`; got {source!r}."
      )
    if source.get("higher_is_better") is not None:
      if not isinstance(source["higher_is_better"], bool):
        raise UsageError(
          f"`metric.higher_is_better` must be true or false; got {source['higher_is_better']!r}."
        )
      higher_is_better = source["higher_is_better"]
    source = source["fn"]
  if not isinstance(source, str):
    raise UsageError(f"`metric` must be a string or a mapping; got {source!r}.")
  if source in METRICS:
    return {"metric": source}
  if ":" not in source:
    raise UsageError(
      f"unknown metric {source!r}; give one of {', '.join(METRICS)} or your own as "
      "'package.module:fn', `fn(outputs, labels) -> float`."
    )
  fn = import_object(source)
  if not callable(fn):
    raise InvalidTypeError(f"metric {source!r} names a {type(fn).__name__}, not a function.")
  if higher_is_better is None:
    higher_is_better = getattr(fn, "higher_is_better", None)
  if not isinstance(higher_is_better, bool):
    raise UsageError(
      f"metric {source!r} does not say its direction: set `{source.partition(':')[2]}."
      "higher_is_better = True` (or False) in your code, write `metric: {fn: ..., "
      "higher_is_better: true}` in the recipe, or pass `--metric-direction higher|lower`."
    )
  return {"metric": source, "metric_fn": fn, "metric_higher_is_better": higher_is_better}


def with_metric(model: ZooModel, fields: dict[str, Any]) -> ZooModel:
  """`model` scored with another metric (`load_metric`'s fields)."""
  return dataclasses.replace(model, **{"metric_fn": None, **fields})


def default_metric(kind: str) -> str:
  """The built-in metric for a dataset kind (a user model's default)."""
  from jaxshrink.data.dataset import EMBEDDING, LANGUAGE_MODEL

  return {LANGUAGE_MODEL: "perplexity", EMBEDDING: "cosine"}.get(kind, "accuracy")


def manifest_model(manifest: dict, where: str, *, source: str | None = None) -> ZooModel:
  """The model of a checkpoint: `source` typed by the user (`--model`, may import code), else
  the one its manifest names (`checkpoint_model`), checked against the stored params' shapes.

  Raises:
    UsageError: the manifest records no model and no `source` is given.
    CheckpointError: the named model is refused, or its params do not match the checkpoint's.
  """
  import jax

  from jaxshrink import export
  from jaxshrink.tree import flatten_to_store

  if source:
    model = load_model(source)
  elif manifest["model"]:
    model = checkpoint_model(manifest["model"], field="model", where=where)
  else:
    raise UsageError(f"`{where}` records no model; pass --model module:factory.")
  abstract = jax.eval_shape(model.init, jax.random.key(0))
  shapes = {p: tuple(a.shape) for p, _, a in flatten_to_store(abstract)}
  export.check_matches(manifest, shapes, what=source or manifest["model"])
  return model
