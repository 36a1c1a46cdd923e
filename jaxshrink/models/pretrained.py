"""`pretrained(name)`: zoo weights trained once per machine, then loaded from the cache.

Each entry is a directory `cache_dir()/zoo/<name>-v1-<recipe hash>/` holding an orbax checkpoint
of the param tree (`params/`) and `meta.json` (the training recipe, time and test metric). The
directory name carries a hash of everything that determines the weights (steps, learning rate,
batch size, augmentation, data, param shapes, ...), so a changed recipe trains into a new entry
and never silently serves old weights, and two recipes under one name (a custom `ZooModel`, an
experiment beside the zoo default) each keep their own entry instead of deleting each other's.

Entries are written into a private temporary sibling and renamed into place, so concurrent
processes (pytest-xdist workers) never load a half-written entry; when two train at once, the
first rename wins and the other copy is dropped. A file lock per entry makes concurrent callers
wait for one trainer instead of training in parallel.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import pathlib
import shutil
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxshrink.data.cache import cache_dir, commit_dir, temporary_sibling_dir
from jaxshrink.data.registry import dataset_key
from jaxshrink.data.sources import load_data_source
from jaxshrink.errors import InvalidTypeError, JaxshrinkError
from jaxshrink.models.base import ZooModel
from jaxshrink.models.registry import get_model
from jaxshrink.models.training import evaluate, train

ZOO_CACHE_VERSION = "v1"
PRETRAINED_SEED = 0
# What a cache entry holds; a damaged entry is deleted and retrained only when it holds nothing
# else (a directory with other files was not written here and is left alone).
ENTRY_FILES = frozenset({"params", "meta.json"})


def pretrained_dir(name_or_model: str | ZooModel) -> pathlib.Path:
  """Cache directory of a model's pretrained weights under its current recipe (may not exist)."""
  model = _resolve(name_or_model)
  return _entry_dir(model.name, _abstract_and_recipe(model)[1])


def _entry_dir(name: str, recipe: dict) -> pathlib.Path:
  text = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
  key = hashlib.sha256(text.encode()).hexdigest()[:12]
  return cache_dir() / "zoo" / f"{name}-{ZOO_CACHE_VERSION}-{key}"


def _resolve(name_or_model: str | ZooModel) -> ZooModel:
  if isinstance(name_or_model, ZooModel):
    return name_or_model
  if isinstance(name_or_model, str):
    return get_model(name_or_model)
  raise InvalidTypeError(
    f"`name_or_model` must be a zoo model name or a ZooModel; got {type(name_or_model).__name__}."
  )


def _recipe(model: ZooModel, abstract: dict) -> dict:
  """Everything that determines the trained weights, as JSON-compatible values."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
  augment = model.augment
  return {
    "data": model.data,
    # A new corpus or tokenizer retrains: weights trained on old token ids would score garbage.
    "data_key": dataset_key(model.data),
    "seed": PRETRAINED_SEED,
    "steps": model.train_steps,
    "learning_rate": model.learning_rate,
    "batch_size": model.batch_size,
    "weight_decay": model.weight_decay,
    "warmup_steps": model.warmup_steps,
    "augment": None if augment is None else getattr(augment, "__qualname__", repr(augment)),
    "params": {
      jax.tree_util.keystr(path, simple=True, separator="/"): [list(leaf.shape), str(leaf.dtype)]
      for path, leaf in leaves
    },
  }


def _abstract_and_recipe(model: ZooModel) -> tuple[dict, dict]:
  """`model.init`'s shapes and dtypes, and the recipe of its cache entry.

  The recipe goes through a JSON round trip so tuples and ints compare equal to what a previous
  run wrote in `meta.json`.
  """
  abstract = jax.eval_shape(model.init, jax.random.key(PRETRAINED_SEED))
  return abstract, json.loads(json.dumps(_recipe(model, abstract)))


def _restore(entry: pathlib.Path, abstract: dict, recipe: dict) -> dict:
  """Loads an entry, checking its recipe and that structure, shapes and dtypes match exactly."""
  meta = json.loads((entry / "meta.json").read_text())
  if meta.get("recipe") != recipe:
    raise JaxshrinkError("it was trained with a different recipe or architecture (stale entry)")
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(entry.absolute() / "params", abstract)
  if jax.tree.structure(params) != jax.tree.structure(abstract):
    raise JaxshrinkError(f"cached param tree at {str(entry)!r} has a different structure.")
  for leaf, want in zip(jax.tree.leaves(params), jax.tree.leaves(abstract), strict=True):
    if leaf.shape != want.shape or leaf.dtype != want.dtype:
      raise JaxshrinkError(
        f"cached leaf {leaf.shape} {leaf.dtype} at {str(entry)!r}; expected {want.shape} "
        f"{want.dtype}."
      )
  return params


def _save(entry: pathlib.Path, params: dict, meta: dict) -> None:
  """Writes the checkpoint and metadata to a temporary sibling, then renames it to `entry`."""
  tmp = temporary_sibling_dir(entry)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp.absolute() / "params", params)
      checkpointer.wait_until_finished()
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    commit_dir(tmp, entry)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


def pretrained(name_or_model: str | ZooModel, *, progress: bool = True) -> dict:
  """Returns trained params for a zoo model, training and caching them on first use.

  A model shipped with pretrained weights (`model.weights`, e.g. `minilm-l6`) is not trained:
  its weights are loaded (no cache entry is written) and checked against `model.init`'s
  structure, shapes and dtypes.

  Training uses `jax.random.key(0)` and the model's default recipe and dataset, so the weights are
  deterministic on a given machine. A cache entry that cannot be read (corrupt, truncated, or from
  an incompatible architecture) is deleted with a warning and retrained.

  Args:
    name_or_model: a zoo model name or a `ZooModel` (its `name` and training recipe are the cache
      key, so give custom models unique names).
    progress: show the training progress bar when training is needed.

  Returns:
    The param tree, structured like `model.init(key)`.

  >>> params = pretrained("digits-cnn", progress=False)  # doctest: +SKIP
  >>> params["conv1"]["kernel"].shape  # doctest: +SKIP
  (3, 3, 1, 32)
  """
  model = _resolve(name_or_model)
  if model.weights is not None:
    return _shipped_weights(model)
  abstract, recipe = _abstract_and_recipe(model)
  entry = _entry_dir(model.name, recipe)
  locks = cache_dir() / "locks"
  locks.mkdir(parents=True, exist_ok=True)
  # One trainer per entry across processes (pytest-xdist workers, parallel CLI runs): the
  # others wait on the lock, then load what it cached instead of training a second copy.
  with open(locks / f"{entry.name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      return _load_or_train(model, entry, abstract, recipe, progress=progress)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _shipped_weights(model: ZooModel) -> dict:
  """`model.weights()`, checked leaf by leaf against the architecture."""
  params = model.weights()
  abstract = jax.eval_shape(model.init, jax.random.key(PRETRAINED_SEED))
  got = {jax.tree_util.keystr(p, simple=True, separator="/"): leaf
         for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}  # fmt: skip
  for path, want in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    leaf = got.pop(name, None)
    if leaf is None or tuple(leaf.shape) != tuple(want.shape) or leaf.dtype != want.dtype:
      found = "missing" if leaf is None else f"{tuple(leaf.shape)} {leaf.dtype}"
      raise JaxshrinkError(
        f"pretrained weights of {model.name!r}: param `{name}` is {found}; expected "
        f"{tuple(want.shape)} {want.dtype}. The weights do not fit the model's architecture."
      )
  if got:
    raise JaxshrinkError(
      f"pretrained weights of {model.name!r} hold params the model lacks: {sorted(got)[:5]}."
    )
  return params


def _load_or_train(
  model: ZooModel, entry: pathlib.Path, abstract: dict, recipe: dict, *, progress: bool
) -> dict:
  if entry.exists():
    try:
      return _restore(entry, abstract, recipe)
    except Exception as exc:  # orbax raises many types for damaged files; all mean "retrain"
      plain = entry.is_dir() and not entry.is_symlink()
      names = [p.name for p in entry.iterdir()] if plain else []
      foreign = sorted(set(names) - ENTRY_FILES)
      if not plain or foreign:
        what = f"it also holds {', '.join(foreign[:3])}" if foreign else "not a plain directory"
        raise JaxshrinkError(
          f"pretrained weights for {model.name!r}: {str(entry)!r} cannot be loaded ({exc}), and "
          f"it is not a cache entry this library wrote ({what}), so it is left alone. Move it out "
          "of the cache, or point JAXSHRINK_CACHE at another directory."
        ) from exc
      warnings.warn(
        f"pretrained weights for {model.name!r} at {str(entry)!r} could not be loaded "
        f"({type(exc).__name__}: {exc}); deleting the entry and retraining.",
        RuntimeWarning,
        stacklevel=3,  # point at the caller of `pretrained`
      )
      shutil.rmtree(entry, ignore_errors=True)
  dataset = load_data_source(model.data)
  start = time.perf_counter()
  params = train(model, dataset, key=jax.random.key(PRETRAINED_SEED), progress=progress)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  meta = {
    "name": model.name,
    "framework": model.framework,
    "data": model.data,
    "train_seconds": round(seconds, 2),
    "metric": model.metric,
    "test_score": evaluate(model, params, dataset),
    "num_params": int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params))),
    "jax_version": jax.__version__,
    "recipe": recipe,
  }
  _save(entry, params, meta)
  return params
