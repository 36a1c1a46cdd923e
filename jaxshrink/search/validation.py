"""The rows a `search` verifies its assignments on (`validation_data`), never the test split.

- `corpus`: the offline transfer corpus' last `validation_rows` sentences (everyday English and
  documentation prose), scored against the float model's embeddings; for text models that read
  MiniLM token ids. Calibration from the corpus reads its first rows.
- `train`: the training rows after the ones calibration reads.
- `test`: the test split's first rows, for a model trained on all of its training split.
- `auto` (the default): `corpus` where it fits and no earlier stage trained on it, else `train`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxshrink.encoding import materialize
from jaxshrink.errors import UsageError
from jaxshrink.pipeline import Pipeline, reads_corpus_tokens, transfer_corpus

VALIDATION_SOURCES = ("auto", "train", "test", "corpus")


def validation_source(pipeline: Pipeline, options: dict[str, Any]) -> str:
  """`validation_data` with `auto` resolved: the transfer corpus for a text model that reads
  MiniLM token ids, unless an earlier stage trained on it; the training split otherwise."""
  source = options["validation_data"]
  if source not in VALIDATION_SOURCES:
    raise UsageError(
      f"`validation_data` of `search` must be one of {list(VALIDATION_SOURCES)}; got {source!r}."
    )
  if source != "auto":
    return source
  trained_on_corpus = any(
    str(entry.get("recovered", {}).get("data", "")).startswith("corpus") for entry in pipeline.log
  )
  return "corpus" if reads_corpus_tokens(pipeline) and not trained_on_corpus else "train"


def validation_rows(pipeline: Pipeline, options: dict[str, Any]) -> Any:
  """The dataset with its test split replaced by the rows the search verifies on (see the module
  docstring): held-out corpus sentences, training rows calibration never reads, or with
  `validation_data: test` the test split's first rows."""
  ds = pipeline.dataset
  source = validation_source(pipeline, options)
  if source == "test":
    rows = min(options["validation_rows"], len(ds.x_test))
    return dataclasses.replace(ds, x_test=ds.x_test[:rows], y_test=ds.y_test[:rows])
  if source == "corpus":
    from jaxshrink.models.minilm import embed_ids

    # The corpus' last rows: calibration from the corpus reads its first ones. The targets are
    # the float model's embeddings, as the dataset's own are.
    ids = np.asarray(transfer_corpus(pipeline, "search", "validation_data"))
    x = ids[-min(options["validation_rows"], len(ids)) :]
    x = x[:, : int(np.flatnonzero((x != 0).any(axis=0))[-1]) + 1]  # no all-padding columns
    y = embed_ids(pipeline.float_model.apply, materialize(pipeline.float_params), x)
    return dataclasses.replace(ds, x_test=x, y_test=y)
  start = options["calibration_batches"] * pipeline.model.batch_size
  x, y = np.asarray(ds.x_train), np.asarray(ds.y_train)
  rows = min(options["validation_rows"], len(x) - start)
  if rows < 16:
    raise UsageError(
      f"`search` verifies on the training rows after the {start} that calibration reads "
      f"(`calibration_batches` {options['calibration_batches']} x batch size "
      f"{pipeline.model.batch_size}), and {ds.name!r} has {len(x)}: fewer than 16 are left. "
      "Lower `calibration_batches`."
    )
  return dataclasses.replace(ds, x_test=x[start : start + rows], y_test=y[start : start + rows])
