"""`DistillLoss`: a weighted combination of the distillation losses.

Models may return plain logits, or a dict holding `"logits"` and any named
intermediates (hidden states, attention maps, embeddings). A `FeaturePair`
names one student output and one teacher output and how to match them; hint
pairs whose widths differ get a learned linear projection, trained with the
student (Romero et al., "FitNets", 2015).

>>> loss = DistillLoss(temperature=4.0, alpha=0.9,
...                    pairs=(FeaturePair("hidden", "hidden", kind="mse", weight=0.1),))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxshrink.distill import losses
from jaxshrink.errors import InvalidTypeError, InvalidValueError

PAIR_KINDS = ("mse", "cosine", "attention")


@dataclasses.dataclass(frozen=True)
class FeaturePair:
  """Match one intermediate output of the student to one of the teacher.

  Attributes:
    student: key in the student's output dict.
    teacher: key in the teacher's output dict.
    kind: `mse` (hint loss, projected when widths differ), `cosine` (embeddings) or
      `attention` (MiniLM KL over `(B, H, T, T)` attention probabilities).
    weight: multiplier of this term in the total loss.
  """

  student: str
  teacher: str
  kind: str = "mse"
  weight: float = 1.0

  def __post_init__(self):
    if self.kind not in PAIR_KINDS:
      raise InvalidValueError(
        f"FeaturePair `kind` must be one of {list(PAIR_KINDS)}; got {self.kind!r} for "
        f"{self.student!r} -> {self.teacher!r}."
      )

  @property
  def name(self) -> str:
    return f"{self.kind}:{self.student}->{self.teacher}"


def model_outputs(out: Any, who: str) -> dict[str, jax.Array]:
  """Normalizes a model output to a dict with a `logits` entry."""
  if isinstance(out, dict):
    if "logits" not in out:
      raise InvalidValueError(
        f"the {who} returned a dict without a `logits` entry (keys: {sorted(out)}); return "
        "`{'logits': ..., <intermediates>}`."
      )
    return out
  if isinstance(out, (jax.Array, jax.ShapeDtypeStruct)) or hasattr(out, "shape"):
    return {"logits": out}
  raise InvalidTypeError(
    f"the {who} must return logits or a dict of arrays with `logits`; got {type(out).__name__}."
  )


@dataclasses.dataclass(frozen=True)
class DistillLoss:
  """Total loss = kd + logit_mse·MSE + logit_cosine·cos + Σ pair.weight · pair loss.

  Attributes:
    temperature: softening temperature of the soft targets, > 0.
    alpha: weight of the soft term vs the hard-label term, in [0, 1].
    kd: weight of Hinton's alpha-mixed KD term (0 drops it).
    logit_mse: weight of the MSE between logits.
    logit_cosine: weight of the cosine loss between logits.
    pairs: intermediate-output matches.
  """

  temperature: float = 4.0
  alpha: float = 0.9
  kd: float = 1.0
  logit_mse: float = 0.0
  logit_cosine: float = 0.0
  pairs: tuple[FeaturePair, ...] = ()

  def __post_init__(self):
    losses.check_temperature(self.temperature)
    losses.check_alpha(self.alpha)
    for field in ("kd", "logit_mse", "logit_cosine"):
      if getattr(self, field) < 0:
        raise InvalidValueError(
          f"DistillLoss `{field}` is a weight and must be >= 0; got {getattr(self, field)!r}."
        )
    object.__setattr__(self, "pairs", tuple(self.pairs))
    for pair in self.pairs:
      if not isinstance(pair, FeaturePair):
        raise InvalidTypeError(
          f"DistillLoss `pairs` must hold FeaturePair; got {type(pair).__name__}."
        )

  def init(self, key: jax.Array, student_out: Any, teacher_out: Any) -> dict[str, Any]:
    """Checks the outputs fit together and returns the learned projections.

    Args:
      key: PRNG key for the projections.
      student_out, teacher_out: model outputs (arrays or `jax.ShapeDtypeStruct`s, e.g. from
        `jax.eval_shape`).

    Returns:
      `{pair.name: {"kernel", "bias"}}` for every `mse` pair whose widths differ.
    """
    s_out = model_outputs(student_out, "student")
    t_out = model_outputs(teacher_out, "teacher")
    losses.check_same_shape(s_out["logits"], t_out["logits"])
    params = {}
    for pair in self.pairs:
      for who, out, k in (("student", s_out, pair.student), ("teacher", t_out, pair.teacher)):
        if k not in out:
          raise InvalidValueError(
            f"feature pair `{pair.name}`: the {who} output has no `{k}`; it has {sorted(out)}."
          )
      s_shape, t_shape = tuple(s_out[pair.student].shape), tuple(t_out[pair.teacher].shape)
      if pair.kind == "mse" and s_shape[-1] != t_shape[-1]:
        key, sub = jax.random.split(key)
        params[pair.name] = losses.init_projection(sub, s_shape[-1], t_shape[-1])
        losses.check_feature_pair(s_shape, t_shape, params[pair.name], pair.name)
      elif pair.kind == "mse":
        losses.check_feature_pair(s_shape, t_shape, None, pair.name)
      elif s_shape != t_shape:
        raise InvalidValueError(
          f"feature pair `{pair.name}` ({pair.kind}) needs equal shapes; got student {s_shape} "
          f"and teacher {t_shape}. Only `mse` pairs learn a width projection."
        )
    return params

  def __call__(
    self,
    loss_params: dict[str, Any],
    student_out: Any,
    teacher_out: Any,
    labels: jax.Array | None,
    mask: jax.Array | None = None,
    feature_mask: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`(total loss, {term name: value})`, all `()` float32.

    `mask` weighs the positions of every term; `feature_mask`, when given, replaces it for
    the feature pairs only: the `(B, T)` real tokens of hidden states when the logits are
    pooled `(B, D)` embeddings that padding never reaches.
    """
    pair_mask = mask if feature_mask is None else feature_mask
    s_out = model_outputs(student_out, "student")
    t_out = model_outputs(teacher_out, "teacher")
    s_logits, t_logits = s_out["logits"], t_out["logits"]
    terms: dict[str, jax.Array] = {}
    total = jnp.zeros((), jnp.float32)
    if self.kd:
      if labels is None or self.alpha == 1.0:
        terms["soft"] = losses.soft_target_loss(
          s_logits, t_logits, temperature=self.temperature, mask=mask
        )
        total += self.kd * terms["soft"]
      else:
        terms["kd"] = losses.kd_loss(
          s_logits, t_logits, labels, temperature=self.temperature, alpha=self.alpha, mask=mask
        )
        total += self.kd * terms["kd"]
    if self.logit_mse:
      terms["logit_mse"] = losses.logit_mse_loss(s_logits, t_logits, mask=mask)
      total += self.logit_mse * terms["logit_mse"]
    if self.logit_cosine:
      terms["logit_cosine"] = losses.cosine_embedding_loss(s_logits, t_logits, mask=mask)
      total += self.logit_cosine * terms["logit_cosine"]
    for pair in self.pairs:
      s, t = s_out[pair.student], t_out[pair.teacher]
      if pair.kind == "mse":
        value = losses.feature_loss(s, t, projection=loss_params.get(pair.name), mask=pair_mask)
      elif pair.kind == "cosine":
        value = losses.cosine_embedding_loss(s, t, mask=pair_mask)
      else:
        value = losses.attention_transfer_loss(s, t, mask=pair_mask)
      terms[pair.name] = value
      total += pair.weight * value
    return total, terms
