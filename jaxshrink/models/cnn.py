"""`digits-cnn` (Linen) and `digits-cnn-nnx` (NNX): two 3x3 convs, 2x2 average pool, two Dense.

Both versions name their layers `conv1, conv2, dense1, dense2`, so their param trees have identical
paths and shapes (`conv2/kernel` is (3, 3, 32, 64)) and weights can be moved between them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from jaxshrink.data.augment import random_translate
from jaxshrink.models.base import ZooModel, zoo_model
from jaxshrink.models.mlp import DIGITS_INPUT_SHAPE, DIGITS_NUM_CLASSES

# Shared recipe: both frameworks must reach the same accuracy with the same budget. Random
# 1-pixel shifts are worth ~1.5 points of test accuracy on digits.
CNN_RECIPE = dict(data="digits", metric="accuracy", train_steps=800, learning_rate=2e-3,
                  batch_size=64, augment=random_translate)  # fmt: skip


class DigitsCNN(nn.Module):
  """Linen CNN over (B, 8, 8, 1) float32 images; returns (B, 10) logits.

  Attributes:
    dot_general: optional replacement for `lax.dot_general` in the Dense layers (quantization
      hook); the convolutions keep `lax.conv_general_dilated`.
  """

  channels1: int = 32
  channels2: int = 64
  hidden: int = 128
  num_classes: int = DIGITS_NUM_CLASSES
  dot_general: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(self.channels1, (3, 3), padding="SAME", name="conv1")(x))
    x = nn.relu(nn.Conv(self.channels2, (3, 3), padding="SAME", name="conv2")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden, dot_general=self.dot_general, name="dense1")(x))
    return nn.Dense(self.num_classes, dot_general=self.dot_general, name="dense2")(x)


class DigitsCNNNNX(nnx.Module):
  """NNX twin of `DigitsCNN` with the same param paths and shapes."""

  def __init__(
    self,
    *,
    rngs: nnx.Rngs,
    in_channels: int = 1,
    channels1: int = 32,
    channels2: int = 64,
    hidden: int = 128,
    num_classes: int = DIGITS_NUM_CLASSES,
    image_size: int = 8,
    dot_general: Any = None,
  ):
    extra = {} if dot_general is None else {"dot_general": dot_general}
    self.conv1 = nnx.Conv(in_channels, channels1, (3, 3), padding="SAME", rngs=rngs)
    self.conv2 = nnx.Conv(channels1, channels2, (3, 3), padding="SAME", rngs=rngs)
    pooled = (image_size // 2) ** 2 * channels2
    self.dense1 = nnx.Linear(pooled, hidden, rngs=rngs, **extra)
    self.dense2 = nnx.Linear(hidden, num_classes, rngs=rngs, **extra)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nnx.relu(self.dense1(x))
    return self.dense2(x)


def digits_cnn() -> ZooModel:
  """The Linen digits CNN (~150k params)."""
  return zoo_model(
    "digits-cnn",
    DigitsCNN(),
    DIGITS_INPUT_SHAPE,
    "float32",
    "CNN conv32-conv64-pool-128-10 on 8x8 digits (Linen)",
    **CNN_RECIPE,
  )


def digits_cnn_nnx() -> ZooModel:
  """The NNX digits CNN, same architecture and param paths as `digits_cnn`."""
  return zoo_model(
    "digits-cnn-nnx",
    DigitsCNNNNX,
    DIGITS_INPUT_SHAPE,
    "float32",
    "CNN conv32-conv64-pool-128-10 on 8x8 digits (NNX)",
    **CNN_RECIPE,
  )
