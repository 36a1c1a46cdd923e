"""`digits-mlp` (Linen) and `digits-mlp-nnx` (NNX): flatten -> 256 -> 128 -> 10.

Both versions name their layers `dense1..dense3`, so their param trees have identical paths and
shapes (`dense1/kernel` is (64, 256)) and weights can be moved between them unchanged.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from jaxshrink.models.base import ZooModel, zoo_model

DIGITS_INPUT_SHAPE = (8, 8, 1)
DIGITS_NUM_CLASSES = 10
# Shared recipe: both frameworks must reach the same accuracy with the same budget. No shift
# augmentation: without convolutions the MLP underfits shifted digits (~96% vs ~98% test).
MLP_RECIPE = dict(data="digits", metric="accuracy", train_steps=1500, learning_rate=1e-3,
                  batch_size=64)  # fmt: skip


class DigitsMLP(nn.Module):
  """Linen MLP over flattened (B, 8, 8, 1) float32 images; returns (B, 10) logits.

  Attributes:
    dot_general: optional replacement for `lax.dot_general` in every Dense (quantization hook).
  """

  hidden1: int = 256
  hidden2: int = 128
  num_classes: int = DIGITS_NUM_CLASSES
  dot_general: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden1, dot_general=self.dot_general, name="dense1")(x))
    x = nn.relu(nn.Dense(self.hidden2, dot_general=self.dot_general, name="dense2")(x))
    return nn.Dense(self.num_classes, dot_general=self.dot_general, name="dense3")(x)


class DigitsMLPNNX(nnx.Module):
  """NNX twin of `DigitsMLP` with the same param paths and shapes."""

  def __init__(
    self,
    *,
    rngs: nnx.Rngs,
    in_features: int = 64,
    hidden1: int = 256,
    hidden2: int = 128,
    num_classes: int = DIGITS_NUM_CLASSES,
    dot_general: Any = None,
  ):
    extra = {} if dot_general is None else {"dot_general": dot_general}
    self.dense1 = nnx.Linear(in_features, hidden1, rngs=rngs, **extra)
    self.dense2 = nnx.Linear(hidden1, hidden2, rngs=rngs, **extra)
    self.dense3 = nnx.Linear(hidden2, num_classes, rngs=rngs, **extra)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    x = nnx.relu(self.dense1(x))
    x = nnx.relu(self.dense2(x))
    return self.dense3(x)


def digits_mlp() -> ZooModel:
  """The Linen digits MLP (~50k params)."""
  return zoo_model(
    "digits-mlp",
    DigitsMLP(),
    DIGITS_INPUT_SHAPE,
    "float32",
    "MLP 64-256-128-10 on 8x8 digits (Linen)",
    **MLP_RECIPE,
  )


def digits_mlp_nnx() -> ZooModel:
  """The NNX digits MLP, same architecture and param paths as `digits_mlp`."""
  return zoo_model(
    "digits-mlp-nnx",
    DigitsMLPNNX,
    DIGITS_INPUT_SHAPE,
    "float32",
    "MLP 64-256-128-10 on 8x8 digits (NNX)",
    **MLP_RECIPE,
  )
