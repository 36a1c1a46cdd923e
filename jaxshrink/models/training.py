"""Training and evaluation of zoo models: `train`, `evaluate`, `make_optimizer`.

The whole training set lives on device and each jitted step gathers its batch by index, so the
host only sends a (batch,) index vector per step. (A `lax.scan` over steps was tried: XLA:CPU runs
convolutions inside a loop body ~20x slower, so steps stay separate calls.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from jaxshrink.data.dataset import Dataset
from jaxshrink.errors import InvalidValueError, JaxshrinkError
from jaxshrink.models.base import ZooModel

# Progress-bar refreshes per training run.
_PROGRESS_UPDATES = 100


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over every label position, computed in float32.

  Args:
    logits: (..., C) logits of any float dtype.
    labels: (...) integer labels in [0, C).

  Returns:
    () float32 mean negative log-likelihood.

  >>> float(cross_entropy_loss(jnp.zeros((2, 4)), jnp.array([0, 3])))  # log(4)
  1.3862943649291992
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.mean(nll)


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine similarity along the last axis; 0 where either vector is zero.

  >>> cosine_similarity(jnp.array([[1.0, 0.0]]), jnp.array([[2.0, 2.0]])).round(4).tolist()
  [0.7071]
  """
  dot = jnp.sum(a * b, axis=-1)
  norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return dot / jnp.maximum(norms, 1e-12)


def task_loss(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """The training loss a dataset's targets call for.

  Integer targets are labels: softmax cross-entropy (`cross_entropy_loss`). Float targets of the
  outputs' shape are reference embeddings (an "embedding" dataset): mean cosine distance
  `1 - cos(outputs, targets)`, which fine-tunes an encoder back toward its float model.

  Args:
    outputs: logits (..., C) or embeddings (B, D).
    targets: integer labels (...) or float embeddings (B, D).

  Returns:
    () float32 loss.

  >>> float(task_loss(jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 0.0]])))
  0.0
  """
  if jnp.issubdtype(targets.dtype, jnp.floating):
    if targets.shape != outputs.shape:
      raise InvalidValueError(
        f"float `targets` are reference embeddings and need the outputs' shape "
        f"{outputs.shape}; got {targets.shape}. Pass integer labels for cross-entropy."
      )
    return jnp.mean(1.0 - cosine_similarity(outputs.astype(jnp.float32), targets))
  return cross_entropy_loss(outputs, targets)


def embedding_metrics(embeddings: np.ndarray, reference: np.ndarray) -> dict[str, float]:
  """How closely embeddings follow reference embeddings of the same sentences.

  Args:
    embeddings: (N, D) embeddings of a (compressed) model.
    reference: (N, D) embeddings of the float model for the same N sentences.

  Returns:
    `mean_cosine` and `min_cosine`: cosine similarity of each row with its reference row;
    `neighbour_agreement`: the fraction of sentences whose nearest other sentence (top-1 cosine
    neighbour within the N) is the same under both models, a retrieval-level check.

  Raises:
    ValueError: shapes differ, are not 2-D, or N < 2.

  >>> ref = np.eye(3, dtype=np.float32)
  >>> embedding_metrics(ref, ref)
  {'mean_cosine': 1.0, 'min_cosine': 1.0, 'neighbour_agreement': 1.0}
  """
  embeddings = np.asarray(embeddings, np.float64)
  reference = np.asarray(reference, np.float64)
  if embeddings.shape != reference.shape or embeddings.ndim != 2 or embeddings.shape[0] < 2:
    raise InvalidValueError(
      f"`embeddings` and `reference` must both be (N, D) with N >= 2; got {embeddings.shape} "
      f"and {reference.shape}."
    )

  def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

  e, r = unit(embeddings), unit(reference)
  cosines = np.sum(e * r, axis=-1)

  def neighbours(x):
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return np.argmax(sims, axis=-1)

  agreement = np.mean(neighbours(e) == neighbours(r))
  return {
    "mean_cosine": float(np.mean(cosines)),
    "min_cosine": float(np.min(cosines)),
    "neighbour_agreement": float(agreement),
  }


def make_optimizer(model: ZooModel, steps: int) -> optax.GradientTransformation:
  """Gradient clipping + AdamW with linear warmup and cosine decay to 5% of the peak rate.

  Args:
    model: supplies `learning_rate`, `weight_decay` and `warmup_steps`.
    steps: total number of steps, the length of the cosine schedule.
  """
  return _optimizer(model.learning_rate, model.weight_decay, model.warmup_steps, steps)


def _optimizer(
  learning_rate: float, weight_decay: float, warmup_steps: int, steps: int
) -> optax.GradientTransformation:
  # Short runs (tests, smoke checks) keep a proportionate warmup instead of never leaving it.
  warmup = min(warmup_steps, steps // 10)
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0 if warmup else learning_rate,
    peak_value=learning_rate,
    warmup_steps=warmup,
    decay_steps=max(steps, warmup + 1),
    end_value=0.05 * learning_rate,
  )
  return optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(schedule, weight_decay=weight_decay),
  )


def _check_compatible(model: ZooModel, dataset: Dataset, split: str) -> None:
  """Fails early, with a readable message, when the model's logits cannot score the labels."""
  x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
  if x.shape[0] == 0:
    raise JaxshrinkError(
      f"dataset {dataset.name!r} has no {split} examples; use a source with a {split} split."
    )
  spec = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
  try:
    logits = jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.key(0)), spec)
  except Exception as exc:  # any trace-time failure means the shapes/dtypes do not fit
    raise JaxshrinkError(
      f"model {model.name!r} cannot take inputs of shape {x.shape[1:]} and dtype {x.dtype} from "
      f"dataset {dataset.name!r} (expected {model.input_shape}, {model.input_dtype}): {exc}"
    ) from exc
  if model.metric == "cosine":
    if logits.shape != (1, *y.shape[1:]):
      raise JaxshrinkError(
        f"model {model.name!r} returns embeddings of shape {logits.shape[1:]} per example but "
        f"dataset {dataset.name!r} has targets of shape {y.shape[1:]}; they must match."
      )
    return
  if logits.shape[:-1] != (1, *y.shape[1:]):
    raise JaxshrinkError(
      f"model {model.name!r} returns logits of shape {logits.shape[1:]} per example but dataset "
      f"{dataset.name!r} has labels of shape {y.shape[1:]}; expected logits {(*y.shape[1:], 'C')}."
    )


def _batch_indices(num_examples: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
  """(steps, batch) int32 indices: consecutive slices of fresh permutations (epoch shuffling)."""
  rng = np.random.default_rng(seed)
  needed = steps * batch_size
  epochs = math.ceil(needed / num_examples)
  flat = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])
  return flat[:needed].reshape(steps, batch_size).astype(np.int32)


# Keyed on the recipe's values (not on a fresh optimizer object), so retraining the same model with
# the same recipe in one process (benchmarks, cache repairs) reuses the compiled step.
@functools.lru_cache(maxsize=32)
def _train_step_fn(
  apply: Callable, augment: Callable | None, optimizer_args: tuple[float, float, int, int]
) -> tuple[optax.GradientTransformation, Callable]:
  """The optimizer and its jitted step `(params, opt_state, x_all, y_all, batch_index, key, step)`.

  The step returns `(params, opt_state, loss)`; `params` and `opt_state` are donated.

  The augmentation key is derived inside the step from `(key, step)`, so the host sends only
  the (batch,) indices and a scalar per step.
  """
  optimizer = _optimizer(*optimizer_args)

  def loss_fn(params, x, y):
    return task_loss(apply(params, x), y)

  def train_step(params, opt_state, x_all, y_all, batch_index, key, step):
    x, y = x_all[batch_index], y_all[batch_index]
    if augment is not None:
      x = augment(jax.random.fold_in(key, step), x)
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return optimizer, jax.jit(train_step, donate_argnums=(0, 1))


def train(
  model: ZooModel,
  dataset: Dataset,
  *,
  steps: int | None = None,
  key: jax.Array | None = None,
  progress: bool = True,
) -> dict:
  """Trains `model` from scratch on `dataset`'s training split.

  Args:
    model: the model and its recipe (`learning_rate`, `batch_size`, `weight_decay`, ...).
    dataset: supplies `x_train`, `y_train`.
    steps: optimizer steps; defaults to `model.train_steps`.
    key: PRNG key for the initialization and the batch order; defaults to `jax.random.key(0)`.
      The same key gives the same params on the same machine.
    progress: show a rich progress bar with the running loss.

  Returns:
    The trained param tree (same structure as `model.init(key)`).

  >>> from jaxshrink.data import get_dataset
  >>> from jaxshrink.models import get_model
  >>> params = train(get_model("digits-mlp"), get_dataset("digits"), steps=10, progress=False)
  >>> params["dense1"]["kernel"].shape
  (64, 256)
  """
  steps = model.train_steps if steps is None else int(steps)
  if steps < 1:
    raise InvalidValueError(f"`steps` must be >= 1; got {steps}.")
  _check_compatible(model, dataset, "train")
  key = jax.random.key(0) if key is None else key
  init_key, data_key, augment_key = jax.random.split(key, 3)
  seed = int(jax.random.randint(data_key, (), 0, np.iinfo(np.int32).max))
  indices = _batch_indices(dataset.num_train, steps, model.batch_size, seed)

  optimizer_args = (model.learning_rate, model.weight_decay, model.warmup_steps, steps)
  optimizer, train_step = _train_step_fn(model.apply, model.augment, optimizer_args)
  params = model.init(init_key)
  opt_state = optimizer.init(params)
  x_all, y_all = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
  # Reading the loss blocks until the step is done, so do it only when the bar is refreshed.
  refresh_every = max(1, steps // _PROGRESS_UPDATES)

  with Progress(
    TextColumn("[bold]train {task.fields[model]}"),
    BarColumn(),
    MofNCompleteColumn(),
    TextColumn("loss {task.fields[loss]}"),
    TimeElapsedColumn(),
    disable=not progress,
  ) as bar:
    task = bar.add_task("train", total=steps, model=model.name, loss="-")
    for step in range(steps):
      params, opt_state, loss = train_step(
        params, opt_state, x_all, y_all, indices[step], augment_key, np.int32(step)
      )
      if progress and ((step + 1) % refresh_every == 0 or step + 1 == steps):
        bar.update(task, completed=step + 1, loss=f"{float(loss):.4f}")
  return params


@functools.lru_cache(maxsize=32)
def _batch_stats_fn(apply: Callable, metric: str) -> Callable:
  """Jitted `(params, x, y, mask) -> (score_sum, count)` for one padded batch."""

  def batch_stats(params, x, y, mask):
    logits = apply(params, x).astype(jnp.float32)
    if metric == "cosine":
      scores = cosine_similarity(logits, y.astype(jnp.float32))
      weights = mask.astype(jnp.float32)
      return jnp.sum(scores * weights), jnp.sum(weights)
    # Per-example mask broadcast over the label positions (tokens for a language model).
    weights = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (y.ndim - 1)), y.shape)
    weights = weights.astype(jnp.float32)
    if metric == "accuracy":
      scores = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
    else:
      scores = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(scores * weights), jnp.sum(weights)

  return jax.jit(batch_stats)


def evaluate(
  model: ZooModel, params: dict, dataset: Dataset, *, split: str = "test", batch_size: int = 512
) -> float:
  """Scores `params` on a dataset split with the model's metric.

  Args:
    model: supplies `apply` and `metric`.
    params: param tree for `model.apply`.
    dataset: the data.
    split: "test" or "train".
    batch_size: examples per jitted call; the last batch is padded (and masked) so every call
      has the same shape and compiles once.

  Returns:
    Accuracy in [0, 1] (fraction of correct labels, per token for a language model),
    perplexity `exp(mean token NLL)` >= 1, or the mean cosine similarity in [-1, 1] between the
    model's embeddings and the dataset's target embeddings (metric "cosine").

  >>> from jaxshrink.data import get_dataset
  >>> from jaxshrink.models import get_model
  >>> model = get_model("digits-mlp")
  >>> 0.0 <= evaluate(model, model.init(jax.random.key(0)), get_dataset("digits")) <= 1.0
  True
  """
  if split not in ("train", "test"):
    raise InvalidValueError(f"`split` must be 'train' or 'test'; got {split!r}.")
  if batch_size < 1:
    raise InvalidValueError(f"`batch_size` must be >= 1; got {batch_size}.")
  _check_compatible(model, dataset, split)
  x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
  batch_size = min(batch_size, x.shape[0])
  batch_stats = _batch_stats_fn(model.apply, model.metric)
  total, count = 0.0, 0.0
  for start in range(0, x.shape[0], batch_size):
    x_batch, y_batch = x[start : start + batch_size], y[start : start + batch_size]
    valid = x_batch.shape[0]
    pad = batch_size - valid
    mask = np.arange(batch_size) < valid
    if pad:
      x_batch = np.concatenate([x_batch, np.zeros((pad, *x.shape[1:]), x.dtype)])
      y_batch = np.concatenate([y_batch, np.zeros((pad, *y.shape[1:]), y.dtype)])
    score, weight = batch_stats(params, x_batch, y_batch, mask)
    # Accumulate on the host in float64: float32 sums over ~100k tokens lose digits.
    total += float(score)
    count += float(weight)
  mean = total / count
  return math.exp(mean) if model.metric == "perplexity" else mean
