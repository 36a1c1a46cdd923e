"""Small student models for distillation on digits (zoo names `digits-student`, `-nnx`).

The teacher of the Hinton experiment is the zoo's `digits-cnn` (~150k params);
the students here are one-hidden-layer MLPs (~10k params, 16x smaller), in linen and nnx
with identical param paths (`hidden`, `out`). Use them in a recipe as
`student: digits-student`. A distilled checkpoint names the student by that zoo name,
so `jaxshrink eval` rebuilds it without importing anything the checkpoint names.

>>> model = digits_student()
>>> model.apply(model.init(jax.random.key(0)), jnp.zeros((2, 8, 8, 1))).shape
(2, 10)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from jaxshrink.models.base import ZooModel, zoo_model

STUDENT_HIDDEN = 128
_INPUT_SHAPE = (8, 8, 1)
_RECIPE = dict(data="digits", metric="accuracy", train_steps=1500, learning_rate=3e-3,
               batch_size=64)  # fmt: skip


class DigitsStudent(nn.Module):
  """Linen MLP 64 -> hidden -> 10 over (B, 8, 8, 1) images; returns (B, 10) logits."""

  hidden: int = STUDENT_HIDDEN
  num_classes: int = 10
  dot_general: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden, dot_general=self.dot_general, name="hidden")(x))
    return nn.Dense(self.num_classes, dot_general=self.dot_general, name="out")(x)


class DigitsStudentNNX(nnx.Module):
  """NNX twin of `DigitsStudent` (same param paths and shapes)."""

  def __init__(self, *, rngs: nnx.Rngs, hidden: int = STUDENT_HIDDEN, dot_general: Any = None):
    extra = {} if dot_general is None else {"dot_general": dot_general}
    self.hidden = nnx.Linear(64, hidden, rngs=rngs, **extra)
    self.out = nnx.Linear(hidden, 10, rngs=rngs, **extra)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    return self.out(nnx.relu(self.hidden(x)))


def digits_student() -> ZooModel:
  """The linen digits student, MLP 64-128-10 (~9.6k params)."""
  return zoo_model(
    "digits-student",
    DigitsStudent(),
    _INPUT_SHAPE,
    "float32",
    "MLP 64-128-10 distillation student on 8x8 digits (Linen)",
    **_RECIPE,
  )


def digits_student_nnx() -> ZooModel:
  """The nnx digits student, same architecture and paths as `digits_student`."""
  return zoo_model(
    "digits-student-nnx",
    DigitsStudentNNX,
    _INPUT_SHAPE,
    "float32",
    "MLP 64-128-10 distillation student on 8x8 digits (NNX)",
    **_RECIPE,
  )
