"""Your own model, as jaxshrink sees it: a pure `apply(tree, *args)` and the tree it takes.

Every technique, `serving.serve`, `export.save` and `export.load` accept a model in the form
you wrote it, and give the result back in that form:

- an `nnx.Module` instance: its whole state is the tree, one dict per variable kind
  (`{"params": {...}, "batch_stats": {...}, "cache": {...}}`, the linen layout), so rules
  select `conv1/kernel` as for linen. RNG streams stay with the module. A compressed model
  comes back as a `Compressed` nnx module you call (`y = cmodel(x)`), running a serving mode;
  a result without encodings (pruned in place) comes back as your own module class.
- a linen module with its variables, `Linen(module, variables)` (or the plain tuple
  `(module, variables)`), every collection included: it comes back as `Linen(module,
  compressed_variables)`; run it with `serve(result, mode)`.
- a pure `apply(params, *args)` with its params: unchanged, the result is the tree.

The model runs in eval mode (`module.eval()`: running averages, no dropout), as a
compressed model is served.

>>> cmodel = quantize_params(model, ".*kernel", QuantSpec(bits=8))   # an nnx CNN
>>> cmodel(x).shape, cmodel.tree["params"]["conv1"]["kernel"].describe()
((8, 10), 'int8 per-channel sym')
>>> save("out/cnn", cmodel); again = load("out/cnn", like=model)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from jaxshrink.encoding import is_encoding
from jaxshrink.errors import InvalidTypeError, InvalidValueError

PARAMS = "params"


@dataclasses.dataclass(frozen=True, eq=False)
class Linen:
  """A linen module with its variables (every collection: `params`, `batch_stats`, ...).

  Attributes:
    module: the linen module.
    variables: its variables, possibly compressed.

  >>> model = Linen(CNN(), CNN().init(key, x))
  >>> served = serve(quantize_params(model, ".*kernel", QuantSpec(bits=8)), "integer")
  """

  module: nn.Module
  variables: Any

  @property
  def apply(self) -> Callable[..., Any]:
    return self.module.apply


def _collection(var_type: type) -> str:
  """The tree key of an nnx variable kind: flax's registered name (`Param` -> `params`,
  `BatchStat` -> `batch_stats`), else the class name in snake case."""
  try:
    return nnx.variablelib.variable_name_from_type(var_type)
  except ValueError:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", var_type.__name__).lower()


@dataclasses.dataclass(frozen=True, eq=False)
class NnxGraph:
  """An nnx module's structure without its arrays: rebuilds it from a tree.

  Attributes:
    graphdef: `nnx.split`'s graph definition.
    treedef: the flattened `nnx.State`'s structure (one leaf per variable).
    addresses: per leaf, `(collection, key, ...)` in the tree, or None for an RNG leaf.
    constants: per leaf, the RNG value kept with the graph (None for tree leaves).
  """

  graphdef: Any
  treedef: Any
  addresses: tuple[tuple[Any, ...] | None, ...]
  constants: tuple[Any, ...]

  @classmethod
  def split(cls, module: nnx.Module) -> tuple[NnxGraph, dict]:
    """The graph of `module`, and its tree (`{collection: nested dict of arrays}`)."""
    graphdef, state = nnx.split(module)
    variables = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    leaves, treedef = jax.tree.flatten(state)
    if len(leaves) != len(variables):
      raise InvalidTypeError(
        f"{type(module).__name__} holds a variable whose value is not one array; jaxshrink "
        "reads nnx variables that hold one array each."
      )
    tree: dict = {}
    addresses, constants = [], []
    for (path, var), leaf in zip(variables, leaves, strict=True):
      if isinstance(var, nnx.RngState):
        addresses.append(None)
        constants.append(leaf)
        continue
      keys = (_collection(type(var)), *(k.key for k in path))
      node = tree
      for key in keys[:-1]:
        node = node.setdefault(key, {})
      node[keys[-1]] = leaf
      addresses.append(keys)
      constants.append(None)
    return cls(graphdef, treedef, tuple(addresses), tuple(constants)), tree

  def normalize(self, tree: Any) -> Any:
    """`tree` with its `params` wrapper: a checkpoint of params only stores them without it."""
    if isinstance(tree, Mapping) and PARAMS in tree and isinstance(tree[PARAMS], Mapping):
      return tree
    return {PARAMS: tree}

  def state(self, tree: Any) -> Any:
    tree = self.normalize(tree)
    leaves = []
    for address, constant in zip(self.addresses, self.constants, strict=True):
      if address is None:
        leaves.append(constant)
        continue
      node = tree
      try:
        for key in address:
          node = node[key]
      except (KeyError, TypeError):
        raise KeyError(
          f"the tree has no `{'/'.join(map(str, address))}`, which the module holds; pass the "
          "tree made from this module."
        ) from None
      leaves.append(node)
    return jax.tree.unflatten(self.treedef, leaves)

  def module(self, tree: Any) -> nnx.Module:
    """A fresh module of the user's class holding `tree`'s arrays (in eval mode)."""
    module = nnx.merge(self.graphdef, self.state(tree))
    module.eval()
    return module

  def apply(self, tree: Any, *args: Any, **kwargs: Any) -> Any:
    """The pure apply: the module rebuilt from `tree` and called; traces under `jit`."""
    return self.module(tree)(*args, **kwargs)


class Compressed(nnx.Module):
  """A compressed nnx model: call it like the module it came from.

  It runs its tree in a serving mode (`jaxshrink.serving`, default `integer`); the tree stays
  compressed (`cmodel.tree`), and `save` writes it.

  Attributes:
    tree: the compressed tree, `{"params": ..., <other collections>}`.
    mode: the serving mode it runs in.

  >>> cmodel(x)                        # jitted, integer kernels for W8A8
  >>> cmodel.with_mode("bfloat16")(x)  # the same tree in another mode
  >>> cmodel.dense()                   # a float module of the original class
  """

  def __init__(self, graph: NnxGraph, tree: Any, mode: str | None = None):
    from jaxshrink import serving

    mode = serving.DEFAULT_MODE if mode is None else mode
    self.tree = nnx.data(graph.normalize(tree))
    self.mode = mode
    self.graph = graph
    self.served = serving.serve(graph.apply, self.tree, mode)

  def __call__(self, *args: Any) -> Any:
    params = self.served.params if self.mode == "decode-once" else self.tree
    return self.served.apply(params, *args)

  def with_mode(self, mode: str) -> Compressed:
    """The same tree run in serving mode `mode`."""
    return Compressed(self.graph, self.tree, mode)

  def dense(self) -> nnx.Module:
    """A float module of the original class, every encoding decoded."""
    from jaxshrink.encoding import materialize

    return self.graph.module(materialize(self.tree))


def is_model(obj: Any) -> bool:
  """True for the model forms `as_functional` reads: an nnx module, `Linen`, or a
  `(linen module, variables)` tuple."""
  if isinstance(obj, (nnx.Module, Linen)):
    return True
  return isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], nn.Module)


def as_functional(model: Any, params: Any = None) -> tuple[Callable[..., Any], Any]:
  """`(apply, tree)` for a model in any form; `params` defaults to the model's own tree.

  An apply function is returned as is with `params`.

  >>> apply, tree = as_functional(CNN(rngs=nnx.Rngs(0)))
  >>> sorted(tree), apply(tree, x).shape
  (['batch_stats', 'params'], (8, 10))
  """
  if isinstance(model, Compressed):
    return model.graph.apply, model.tree if params is None else params
  if isinstance(model, nnx.Module):
    graph, tree = NnxGraph.split(model)
    return graph.apply, tree if params is None else graph.normalize(params)
  if isinstance(model, Linen):
    return model.module.apply, model.variables if params is None else params
  if is_model(model):
    module, variables = model
    return module.apply, variables if params is None else params
  if callable(model):
    return model, params
  raise InvalidTypeError(
    f"expected an nnx module, `Linen(module, variables)` or an `apply(params, x)` function; "
    f"got {type(model).__name__}."
  )


def as_tree(model: Any) -> Any:
  """The tree of a model (`as_functional`); any other value (a tree) as is."""
  return as_functional(model)[1] if is_model(model) else model


def rebuild(like: Any, tree: Any, *, mode: str | None = None) -> Any:
  """`tree` in `like`'s form: a `Compressed` module (or, with no encodings, the user's nnx
  class) for an nnx model, `Linen(module, tree)` for linen; any other `like`: `tree`.

  Args:
    like: the model the tree was made from (or one of the same structure).
    tree: a tree from a technique or `load`.
    mode: the serving mode of a `Compressed` result; default `like`'s mode, else `integer`.
  """
  if isinstance(like, nnx.Module):
    graph = like.graph if isinstance(like, Compressed) else NnxGraph.split(like)[0]
    if any(is_encoding(leaf) for leaf in jax.tree.leaves(tree, is_leaf=is_encoding)):
      if mode is None and isinstance(like, Compressed):
        mode = like.mode
      return Compressed(graph, tree, mode)
    return graph.module(tree)
  if isinstance(like, Linen):
    return Linen(like.module, tree)
  if is_model(like):
    return Linen(like[0], tree)
  return tree


def _wrap_result(model: Any, out: Any, result: str) -> Any:
  return rebuild(model, out) if result == "tree" else out


def accepts_models(fn: Callable[..., Any] | None = None, *, result: str = "tree"):
  """Lets a technique take a model in any form (`as_functional`) and give it back in kind.

  For a function whose first parameter is the tree (`quantize_params(params, rule, ...)`),
  a model there is replaced by its tree. For one that starts `(apply_fn, params, ...)`, a
  model as `apply_fn` supplies both: leave `params` out (`ptq(model, batches, rule, spec)`),
  pass None in its place, or pass a tree there explicitly.

  Args:
    fn: the technique.
    result: `"tree"`: it returns the tree, given back in the model's form; `"as_is"`: it
      returns anything else (`serve`, `tree_report`), returned unchanged.

  >>> @accepts_models
  ... def ptq(apply_fn, params, batches, rule, spec): ...
  """
  if fn is None:
    return functools.partial(accepts_models, result=result)
  if result not in ("tree", "as_is"):
    raise InvalidValueError(f"`result` must be 'tree' or 'as_is'; got {result!r}.")
  names = list(inspect.signature(fn).parameters)
  takes_apply = len(names) > 1 and names[1] in ("params", "ctree", "tree")

  @functools.wraps(fn)
  def wrapper(*args: Any, **kwargs: Any) -> Any:
    first = args[0] if args else kwargs.get(names[0])
    if not is_model(first):
      return fn(*args, **kwargs)
    if not takes_apply:
      args = (as_tree(first), *args[1:]) if args else args
      if not args:
        kwargs[names[0]] = as_tree(first)
      return _wrap_result(first, fn(*args, **kwargs), result)
    rest = list(args[1:]) if args else []
    given = kwargs.pop(names[1], None)
    if given is None and rest and (rest[0] is None or isinstance(rest[0], Mapping)):
      given = rest.pop(0)
    apply_fn, tree = as_functional(first, given)
    kwargs.pop(names[0], None)
    return _wrap_result(first, fn(apply_fn, tree, *rest, **kwargs), result)

  return wrapper


def functional(model: Any) -> tuple[Callable[[Any, Any], Any], Any]:
  """A pure `apply(params, x)` for training a model, and its trainable params when it holds
  them.

  Accepts a `jaxshrink.models.ZooModel` (its `apply`, params None), an unbound linen
  `nn.Module` (`module.apply({"params": p}, x)`, params None), an `nnx.Module` (split
  into graph and `nnx.Param` state: returns that state as params, the other state is held
  as it is; put trained params back with `nnx.update(module, params)`), or a plain callable
  (returned as is). To compress a model, use `as_functional`, which keeps every collection.

  >>> apply, params = functional(nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
  >>> apply(params, jnp.ones((3, 4))).shape
  (3, 2)
  """
  from jaxshrink.models import ZooModel

  if isinstance(model, ZooModel):
    return model.apply, None
  if isinstance(model, nn.Module):
    module = model
    return (lambda p, x: module.apply({"params": p}, x)), None
  if isinstance(model, nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return (lambda p, x: nnx.merge(graphdef, p, rest)(x)), params
  if callable(model):
    return model, None
  raise InvalidTypeError(
    f"expected a ZooModel, a linen/nnx module or an `apply(params, x)` callable; got "
    f"{type(model).__name__}."
  )
