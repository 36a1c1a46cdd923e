"""Measuring a parameter tree: the model's metric on a dataset's test split.

Every evaluation runs the tree as it is stored (`serving_model`): W8A8 layers on the integer
path, other encodings decoded inside jit, so the number measured is the number served.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import jax
import numpy as np

from jaxshrink.errors import InvalidTypeError, JaxshrinkError

# Rows of the test split timed to choose the serving mode (fewer when the split is smaller).
SERVING_BATCH = 64


def evaluate_tree(model: Any, tree: Any, dataset: Any, *, served: bool = False) -> float:
  """The model's metric on `dataset`'s test split, running `tree` on the integer path.

  `served=True`: `model.apply` and `tree` are already a serving mode's (`serving.serve`).
  """
  from jaxshrink import models

  model = model if served else serving_model(model)
  if model.metric_fn is not None:
    return evaluate_user_metric(model, tree, dataset)
  return float(models.evaluate(model, tree, dataset))


def evaluate_user_metric(model: Any, tree: Any, dataset: Any, *, batch_size: int = 256) -> float:
  """`model.metric_fn(outputs, labels)` on the whole test split, run in jitted batches.

  The last batch is padded to the same shape (one compile), and its padding dropped.
  """
  apply = jax.jit(model.apply)
  x, y = np.asarray(dataset.x_test), np.asarray(dataset.y_test)
  if len(x) == 0:
    raise JaxshrinkError(f"{dataset.name!r} has an empty test split; nothing to evaluate.")
  size = min(batch_size, len(x))
  outputs = []
  for start in range(0, len(x), size):
    batch = x[start : start + size]
    valid = len(batch)
    if valid < size:
      batch = np.concatenate([batch, np.zeros((size - valid, *x.shape[1:]), x.dtype)])
    out = apply(tree, batch)
    outputs.append(jax.tree.map(lambda a, n=valid: np.asarray(a)[:n], out))
  joined = jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)
  value = model.metric_fn(joined, y)
  try:
    return float(value)
  except (TypeError, ValueError):
    raise InvalidTypeError(
      f"metric {model.metric!r} must return a number; got {type(value).__name__}."
    ) from None


def evaluate_metrics(model: Any, tree: Any, dataset: Any, *, served: bool = False) -> dict:
  """`{"value": <the model's metric>}`, plus secondary metrics for embedding models.

  For a "cosine" model the test split is embedded once and scored with
  `models.embedding_metrics` against the dataset's target embeddings: `value` is the mean
  cosine, and `min_cosine` and `neighbour_agreement` are added. `served` as in
  `evaluate_tree`.
  """
  if model.metric != "cosine" or model.metric_fn is not None:
    return {"value": evaluate_tree(model, tree, dataset, served=served)}
  from jaxshrink import models
  from jaxshrink.models.minilm import embed_ids

  apply = model.apply if served else serving_model(model).apply
  embeddings = embed_ids(apply, tree, dataset.x_test)
  scores = models.embedding_metrics(embeddings, dataset.y_test)
  return {
    "value": scores["mean_cosine"],
    "min_cosine": scores["min_cosine"],
    "neighbour_agreement": scores["neighbour_agreement"],
  }


_SERVING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def serving_model(model: Any) -> Any:
  """`model` whose apply runs W8A8 layers on the integer path and decodes other encodings
  inside jit; one per model, so repeated evaluations reuse the compiled function."""
  from jaxshrink.quant import quantized_apply

  if model not in _SERVING:
    _SERVING[model] = dataclasses.replace(model, apply=quantized_apply(model.apply))
  return _SERVING[model]


def timing_batch(dataset: Any, rows: int = SERVING_BATCH) -> Any:
  """The first `rows` test inputs (repeated when the split is smaller): a fixed timed batch."""
  x = np.asarray(dataset.x_test)
  return np.resize(x, (rows, *x.shape[1:])) if len(x) < rows else x[:rows]
