"""What recipe stages share: the `Pipeline` that flows through them and the stage registry.

A stage module (`jaxshrink/*/stage.py`) imports this module to register its kind;
`jaxshrink.stages` imports every stage module, and `jaxshrink.recipes` reads the registry
through `jaxshrink.stages`. Nothing here imports either, so registration has no cycle.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxshrink.capture import padding
from jaxshrink.compose import recast, uncast
from jaxshrink.errors import InvalidValueError, UsageError
from jaxshrink.tree import Rule


class _Required:
  def __repr__(self) -> str:
    return "<required>"


REQUIRED: Any = _Required()

# Options every stage that selects leaves accepts; they build a `Rule`.
RULE_OPTIONS: dict[str, Any] = {"target": ".*", "exclude": None, "min_ndim": 0, "min_size": 0}


@dataclasses.dataclass(frozen=True)
class StageKind:
  """A recipe stage: its option defaults and the function that runs it."""

  name: str
  options: Mapping[str, Any]
  run: Callable[[Pipeline, dict[str, Any]], Pipeline]
  doc: str


STAGES: dict[str, StageKind] = {}


def register_stage(name: str, *, options: Mapping[str, Any], doc: str):
  """Decorator registering `fn(pipeline, options) -> pipeline` as a stage kind."""

  def wrap(fn):
    STAGES[name] = StageKind(name=name, options=dict(options), run=fn, doc=doc)
    return fn

  return wrap


def suggest(word: str, valid: list[str]) -> str:
  """ " Did you mean `x`?" for the valid word closest to `word`, or ""."""
  close = difflib.get_close_matches(word, valid, n=1)
  return f" Did you mean `{close[0]}`?" if close else ""


def check_options(
  where: str, given: Any, defaults: Mapping[str, Any], *, what: str = "key"
) -> dict[str, Any]:
  """`given` with `defaults` filled in, rejecting unknown keys (naming the closest valid one),
  missing required keys and values of the wrong type."""
  if given is None:
    given = {}
  if not isinstance(given, Mapping):
    raise UsageError(f"{where} must be a mapping of options; got {type(given).__name__}.")
  valid = sorted(defaults)
  for key in given:
    if key not in defaults:
      raise UsageError(
        f"Unknown {what} `{key}` in {where}; valid {what}s: {', '.join(valid)}."
        + suggest(str(key), valid)
      )
  options = {}
  for key, default in defaults.items():
    if key not in given:
      if default is REQUIRED:
        raise UsageError(f"{where} needs the {what} `{key}`.")
      options[key] = default
      continue
    value = given[key]
    expected = type(default)
    if default is not None and default is not REQUIRED and value is not None:
      ok = isinstance(value, expected) or (expected is float and isinstance(value, int))
      if expected is int and isinstance(value, bool):
        ok = False
      if not ok:
        raise UsageError(
          f"{what.capitalize()} `{key}` in {where} must be {expected.__name__}; got "
          f"{value!r} ({type(value).__name__})."
        )
    options[key] = value
  return options


def rule_from_options(options: Mapping[str, Any]) -> Rule:
  return Rule(
    include=options["target"],
    exclude=options["exclude"],
    min_ndim=options["min_ndim"],
    min_size=options["min_size"],
  )


def check_positive(
  options: Mapping[str, Any], name: str, stage: str, *, kind: type = int, nullable: bool = False
) -> None:
  """Refuses option `name` of `stage` unless it is a positive `kind` (int or float).

  Booleans are refused (YAML reads `yes` as true); a float option accepts ints too.

  Raises:
    UsageError: naming the option, the stage, what it must be and what it got.
  """
  value = options[name]
  if value is None and nullable:
    return
  numbers = (int, float) if kind is float else (int,)
  if isinstance(value, bool) or not isinstance(value, numbers) or value <= 0:
    what = "a number > 0 (YAML needs a dot in 1.0e-4)" if kind is float else "a positive int"
    what = f"null or {what}" if nullable else what
    raise UsageError(f"`{name}` of stage `{stage}` must be {what}; got {value!r}.")


# Where calibrated stages read their inputs: the dataset's training split, or the offline
# transfer corpus (many more sentences for a MiniLM-tokenized model).
CALIBRATION_DATA = ("train", "corpus")
# Inputs per calibration batch of the stages that read batches of rows (prune's wanda and
# sparsegpt, factorize's whitened factors); `quantize` uses the model's batch size.
CALIBRATION_ROWS = 128


def reads_corpus_tokens(pipeline: Pipeline) -> bool:
  """Whether the transfer corpus fits the pipeline's model: token ids in, embeddings out."""
  model, dataset = pipeline.model, pipeline.dataset
  return bool(np.issubdtype(np.dtype(model.input_dtype), np.integer)) and (
    dataset.kind == "embedding"
  )


def transfer_corpus(pipeline: Pipeline, stage: str, option: str, part: str = "all") -> np.ndarray:
  """The transfer corpus' token ids (`jaxshrink.data.corpus.transfer_tokens`), `(N, L)` int32.

  `part` "everyday" keeps the corpus' everyday-English half only; "wordnet" is WordNet's usage
  examples instead (`jaxshrink.data.wordnet`).

  Raises:
    UsageError: the model does not read MiniLM token ids (a sentence-embedding model).
  """
  model, dataset = pipeline.model, pipeline.dataset
  if not reads_corpus_tokens(pipeline):
    raise UsageError(
      f"`{option}: {'corpus' if part == 'all' else part}` of stage `{stage}` feeds MiniLM "
      "token ids of the offline transfer "
      f"corpus, but {model.name!r} reads {model.input_dtype} inputs of {dataset.kind} data. Use "
      f"`{option}: train` (the dataset's training split)."
    )
  from jaxshrink.data.corpus import transfer_tokens

  return transfer_tokens(part=part)


def check_calibration_data(source: Any, stage: str) -> str:
  """`source` if it names calibration data (`CALIBRATION_DATA`), else a `UsageError`."""
  if source not in CALIBRATION_DATA:
    raise UsageError(
      f"`calibration_data` of stage `{stage}` must be one of {list(CALIBRATION_DATA)}; got "
      f"{source!r}."
    )
  return source


def calibration_ids(pipeline: Pipeline, source: str, stage: str) -> np.ndarray:
  """The rows calibration draws from: the training split's inputs (`source` "train") or the
  transfer corpus' token ids ("corpus", which `transfer_corpus` refuses, naming the fix, for a
  model that does not read them).

  Raises:
    UsageError: an unknown `source`, or "corpus" for a model it does not fit.
  """
  check_calibration_data(source, stage)
  if source == "train":
    return np.asarray(pipeline.dataset.x_train)
  return transfer_corpus(pipeline, stage, "calibration_data")


def length_sorted_batches(ids: np.ndarray, count: int, rows: int, pad_id: int) -> list[np.ndarray]:
  """Token-id batches of similar lengths, each cut after its longest row.

  Calibration never counts padding (`jaxshrink.capture.padding`), so cutting it only saves
  compute, and sorting first keeps the cut deep.

  Args:
    ids: `(N, L)` int token ids, padded with `pad_id`.
    count: how many batches (fewer when `ids` holds fewer than `count * rows` rows).
    rows: rows per batch.
    pad_id: the padding id.

  Returns:
    Up to `count` int32 arrays `(rows, length_b)` from the first `count * rows` rows, shortest
    first.
  """
  ids = np.asarray(ids)
  if ids.ndim != 2 or ids.shape[0] == 0:
    raise InvalidValueError(
      f"calibration needs (N, L) token ids with N >= 1; got shape {ids.shape}."
    )
  count = max(1, min(count, -(-ids.shape[0] // rows)))
  chosen = ids[: count * rows]
  chosen = chosen[np.argsort((chosen != pad_id).sum(axis=1), kind="stable")]
  out = []
  for part in np.array_split(chosen, count):
    longest = max(1, int((part != pad_id).sum(axis=1).max()))
    out.append(part[:, :longest].astype(np.int32))
  return out


def calibration_inputs(
  pipeline: Pipeline, source: str, count: int, rows: int, stage: str
) -> list[np.ndarray]:
  """Up to `count` calibration batches of `rows` inputs each, deterministic.

  `source` "train": consecutive rows of the dataset's training split, from the first (one
  batch of all of them when it holds fewer than `rows`).
  "corpus": the first `count * rows` sentences of the (shuffled) transfer corpus, as
  `length_sorted_batches`.

  Raises:
    UsageError: an unknown `source`, `count` < 1, or "corpus" for a model it does not fit.
  """
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise UsageError(f"`calibration_batches` of stage `{stage}` must be >= 1; got {count!r}.")
  x = calibration_ids(pipeline, source, stage)
  if source == "train":
    return [x[i * rows : (i + 1) * rows] for i in range(max(1, min(count, len(x) // rows)))]
  pad_id = 0 if pipeline.model.pad_id is None else pipeline.model.pad_id
  return length_sorted_batches(x, count, rows, pad_id)


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """What flows through the stages.

  Attributes:
    model: the zoo model (or user model) being compressed.
    dataset: its data; stages use the training split for calibration/finetuning.
    float_model: the model the float params belong to; a distill stage may
      replace `model` with a student, the reference stays the float model.
    float_params: the float params the recipe started from (the reference).
    tree: the current, possibly compressed, parameter tree.
    key: PRNG key for stages that need randomness; split before use.
    log: one dict per finished stage (kind, options, seconds).
    model_source: how to rebuild `model` (zoo name or `module:factory`); recorded in
      the checkpoint so `eval` can run it. A distill stage sets it to the student's.
  """

  model: Any
  dataset: Any
  float_model: Any
  float_params: Any
  tree: Any
  key: jax.Array
  log: tuple[dict[str, Any], ...] = ()
  model_source: str = ""


def run_stage(pipeline: Pipeline, kind: str, options: dict[str, Any]) -> Pipeline:
  """Runs one registered stage kind with its full options and logs it.

  Cast leaves are storage only: the stage sees them float, and what it leaves float is
  stored cast again. Calibration never counts padding tokens. The stage's log entry merges
  what the stage logged itself (e.g. prune's `pruned` report) with its kind, options and time.
  """
  start, before = time.perf_counter(), len(pipeline.log)
  tree, casts = uncast(pipeline.tree) if kind != "cast" else (pipeline.tree, {})
  with padding(pipeline.model.pad_id):
    pipeline = STAGES[kind].run(dataclasses.replace(pipeline, tree=tree), options)
  pipeline = dataclasses.replace(pipeline, tree=recast(pipeline.tree, casts))
  found = {k: v for e in pipeline.log[before:] for k, v in e.items()}
  seconds = round(time.perf_counter() - start, 3)
  entry = {**found, "stage": kind, "options": options, "seconds": seconds}
  return dataclasses.replace(pipeline, log=pipeline.log[:before] + (entry,))
