"""`ZooModel`: a model as a pair of pure functions, whether it is written in Linen or NNX.

Every zoo model exposes `init(key) -> params` and `apply(params, x) -> logits`, where `params` is a
plain nested dict of arrays (no `{"params": ...}` collection wrapper, no NNX `Variable`s). So
compression code handles one tree format and never needs to know the framework.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxshrink.errors import InvalidTypeError, InvalidValueError

FRAMEWORKS = ("linen", "nnx", "user")
METRICS = ("accuracy", "perplexity", "cosine")
# The fields a stage that trains reads; a user model (`user_model`) may leave them out.
# A model source naming a Hugging Face directory (`jaxshrink.interop.hf.from_hf`).
HF_PREFIX = "hf:"
TRAINING_FIELDS = ("train_steps", "learning_rate", "batch_size")
# What a user model that does not give them gets: `batch_size` also sets the rows of each
# calibration batch (which does not train).
TRAINING_DEFAULTS: dict[str, Any] = {"train_steps": 1000, "learning_rate": 1e-3, "batch_size": 64}
# Metrics where a larger value is better; the rest (perplexity) are lower-is-better.
HIGHER_IS_BETTER = ("accuracy", "cosine")


# eq=False: fields hold functions and modules; identity equality keeps the model hashable.
@dataclasses.dataclass(frozen=True, eq=False)
class ZooModel:
  """A trainable model with its default data and training recipe.

  Attributes:
    name: registry name, also the key of its pretrained cache entry, e.g. "digits-cnn".
    framework: "linen" or "nnx" (how `module` is written; `init`/`apply` hide the difference),
      or "user": your own model (`user_model`), any form; `module` is the object you gave.
    data: default dataset, a name from `jaxshrink.data.list_datasets()` or any
      `load_data_source` string.
    metric: "accuracy" (classification), "perplexity" (language model) or "cosine" (sentence
      embeddings, scored as the mean cosine similarity to the float model's embeddings).
    init: PRNG key -> float32 param tree (plain nested dict of arrays).
    apply: (params, inputs) -> logits; pure, so it works under `jax.jit`, `jax.grad`, `vmap`.
    train_steps: default number of optimizer steps for `train` / `pretrained`.
    learning_rate: peak learning rate.
    batch_size: training batch size.
    input_shape: shape of one example, e.g. (8, 8, 1) or (64,).
    input_dtype: dtype of the inputs, e.g. "float32" or "int32".
    weight_decay: AdamW decoupled weight decay (0 means plain Adam).
    warmup_steps: linear warmup before cosine decay.
    augment: optional training-time augmentation `(key, x_batch) -> x_batch`, applied inside the
      jitted train step (e.g. `jaxshrink.data.augment.random_translate`).
    module: Linen: the `nn.Module` instance (rebuild with e.g. `module.clone(dot_general=...)`).
      NNX: the module class, constructed as `module(rngs=nnx.Rngs(params=key), **kwargs)`.
    description: one line for listings.
    weights: for a pretrained model shipped as weights (e.g. `minilm-l6`): a no-argument
      function returning its float param tree; `models.pretrained` then loads it instead of
      training. None (the default) means the model is trained by `pretrained` on first use.
    metric_fn: a user metric `fn(outputs, labels) -> float`, called once on the whole test
      split's outputs; `metric` is then its name (e.g. `"pkg.mod:fn"`). None: `metric` is
      one of the built-in metrics.
    metric_higher_is_better: the direction of `metric_fn` (ignored without it).
    unset: the training fields (`TRAINING_FIELDS`) the user did not give: a stage that
      trains refuses to run on them (their values are `TRAINING_DEFAULTS`).
    pad_id: for token-id inputs padded to a batch's longest row, the padding id: calibration
      leaves those positions out of its statistics (`jaxshrink.capture.padding`). None: the
      inputs hold no padding.

  >>> from jaxshrink.models import get_model
  >>> model = get_model("digits-mlp")
  >>> params = model.init(jax.random.key(0))
  >>> model.apply(params, jnp.zeros((2, 8, 8, 1), jnp.float32)).shape
  (2, 10)
  """

  name: str
  framework: str
  data: str
  metric: str
  init: Callable[[jax.Array], dict]
  apply: Callable[[dict, jax.Array], jax.Array]
  train_steps: int
  learning_rate: float
  batch_size: int
  input_shape: tuple[int, ...] = ()
  input_dtype: str = "float32"
  weight_decay: float = 0.0
  warmup_steps: int = 0
  augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  module: Any = None
  description: str = ""
  weights: Callable[[], dict] | None = None
  metric_fn: Callable[[Any, Any], float] | None = None
  metric_higher_is_better: bool = True
  unset: tuple[str, ...] = ()
  pad_id: int | None = None

  def __post_init__(self):
    if self.framework not in FRAMEWORKS:
      raise InvalidValueError(
        f"`framework` must be one of {list(FRAMEWORKS)}; got {self.framework!r} for model "
        f"{self.name!r}."
      )
    if self.metric_fn is not None and not callable(self.metric_fn):
      raise InvalidTypeError(f"`metric_fn` of model {self.name!r} must be None or a callable.")
    if self.metric not in METRICS and self.metric_fn is None:
      raise InvalidValueError(
        f"`metric` must be one of {list(METRICS)}; got {self.metric!r} for model {self.name!r}."
      )
    if self.weights is not None and not callable(self.weights):
      raise InvalidTypeError(f"`weights` of model {self.name!r} must be None or a callable.")
    if not callable(self.init) or not callable(self.apply):
      raise InvalidTypeError(f"`init` and `apply` of model {self.name!r} must be callables.")
    for field in ("train_steps", "batch_size"):
      if getattr(self, field) < 1:
        raise InvalidValueError(
          f"`{field}` must be >= 1; got {getattr(self, field)} for {self.name!r}."
        )

  @property
  def higher_is_better(self) -> bool:
    """True for accuracy and cosine, False for perplexity; a user metric's own direction."""
    if self.metric_fn is not None:
      return self.metric_higher_is_better
    return self.metric in HIGHER_IS_BETTER

  def input_spec(self, batch_size: int = 1) -> jax.ShapeDtypeStruct:
    """Shape and dtype of a batch of inputs, for `jax.eval_shape(model.apply, params, spec)`."""
    return jax.ShapeDtypeStruct((batch_size, *self.input_shape), jnp.dtype(self.input_dtype))

  def dummy_input(self, batch_size: int = 1) -> jax.Array:
    """A batch of zeros with the model's input shape and dtype."""
    return jnp.zeros((batch_size, *self.input_shape), jnp.dtype(self.input_dtype))


def linen_functions(
  module: nn.Module, input_shape: tuple[int, ...], input_dtype: str
) -> tuple[Callable[[jax.Array], dict], Callable[[dict, jax.Array], jax.Array]]:
  """Pure `(init, apply)` for a Linen module with a single `params` collection.

  Args:
    module: an unbound `nn.Module` whose `__call__(x)` returns logits.
    input_shape: shape of one example (the batch dimension is added).
    input_dtype: dtype of the inputs.

  Returns:
    `init(key) -> params` returning `variables["params"]` as a plain dict, and
    `apply(params, x) -> logits`.
  """
  dummy = np.zeros((1, *input_shape), np.dtype(input_dtype))

  def init(key: jax.Array) -> dict:
    variables = module.init(key, dummy)
    return flax.core.unfreeze(variables["params"])

  def apply(params: dict, x: jax.Array) -> jax.Array:
    return module.apply({"params": params}, x)

  return init, apply


def nnx_functions(
  module_cls: Callable[..., nnx.Module],
) -> tuple[Callable[[jax.Array], dict], Callable[[dict, jax.Array], jax.Array]]:
  """Pure `(init, apply)` for an NNX module holding only `nnx.Param` variables.

  Args:
    module_cls: constructor called as `module_cls(rngs=nnx.Rngs(params=key))`.

  Returns:
    `init(key) -> params`, the `nnx.to_pure_dict` of the `nnx.Param` state, and
    `apply(params, x) -> logits`, which rebuilds a fresh module from `params` on every call, so it
    is pure (no shared module is mutated) and traces under `jit` / `grad`.
  """
  # The graph structure is fixed; only the leaves change between calls. eval_shape avoids
  # materializing (and randomly initializing) weights that would be thrown away.
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: module_cls(rngs=nnx.Rngs(0))))

  def init(key: jax.Array) -> dict:
    module = module_cls(rngs=nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))

  def apply(params: dict, x: jax.Array) -> jax.Array:
    # tree.map copies the State (and its Variables), so abstract_state itself is never filled in.
    state = jax.tree.map(lambda leaf: leaf, abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)(x)

  return init, apply


def zoo_model(
  name: str,
  module: Any,
  input_shape: tuple[int, ...],
  input_dtype: str,
  description: str,
  **recipe: Any,
) -> ZooModel:
  """A `ZooModel` from a Linen module instance or an NNX module class.

  The framework follows from `module`; `recipe` holds the remaining `ZooModel` fields
  (data, metric, train_steps, learning_rate, batch_size, ...).
  """
  if isinstance(module, nn.Module):
    framework, (init, apply) = "linen", linen_functions(module, input_shape, input_dtype)
  else:
    framework, (init, apply) = "nnx", nnx_functions(module)
  return ZooModel(
    name=name,
    framework=framework,
    init=init,
    apply=apply,
    input_shape=input_shape,
    input_dtype=input_dtype,
    module=module,
    description=description,
    **recipe,
  )


def user_model(
  model: Any, *, name: str, training: dict[str, Any] | None = None, data: str = ""
) -> ZooModel:
  """A `ZooModel` for your own model with its weights, so recipes and `eval` run it.

  Args:
    model: an `nnx.Module` instance, `jaxshrink.model.Linen(module, variables)` or a
      `(linen module, variables)` tuple, or an `(apply, params)` pair (a ZooModel is
      returned as is). Its weights are the float params (`pretrained` returns them).
    name: how the model was named (`"pkg.mod:factory"`), for messages and the checkpoint.
    training: any of `train_steps`, `learning_rate`, `batch_size`; only stages that train
      need them (`unset` lists the missing ones).
    data: its default data source, if any.

  Raises:
    TypeError: `model` is none of those forms.
    ValueError: an unknown training field.

  >>> user_model(CNN(rngs=nnx.Rngs(0)), name="my.models:cnn").metric
  'accuracy'
  """
  from jaxshrink.model import as_functional, is_model

  if isinstance(model, ZooModel):
    return model
  if is_model(model):
    apply, tree = as_functional(model)
  elif isinstance(model, tuple) and len(model) == 2 and callable(model[0]) and model[1] is not None:
    apply, tree = model
  else:
    raise InvalidTypeError(
      f"{name!r} must return (or be) an nnx.Module instance, a (linen module, variables) "
      f"pair, an (apply, params) pair or a ZooModel; got {type(model).__name__}."
    )
  training = dict(training or {})
  unknown = sorted(set(training) - set(TRAINING_FIELDS))
  if unknown:
    raise InvalidValueError(
      f"unknown training field(s) {unknown} for model {name!r}; valid: {list(TRAINING_FIELDS)}."
    )
  return ZooModel(
    name=name,
    framework="user",
    data=data,
    metric="accuracy",  # until the data or the recipe's `metric` says otherwise
    init=lambda key: tree,
    apply=apply,
    weights=lambda: tree,
    module=model,
    unset=tuple(f for f in TRAINING_FIELDS if f not in training),
    **{**TRAINING_DEFAULTS, **training},
  )
