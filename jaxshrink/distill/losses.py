"""Distillation losses: pure functions of student and teacher outputs.

Every loss reduces to a float32 scalar averaged over the valid positions. A
`mask` marks them: `(B,)` for per-example outputs, `(B, T)` bool for token
models (False = padding). Without a mask every position counts.

References: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural
Network" (2015) for the T²-scaled soft targets; Romero et al., "FitNets"
(2015) for hint (feature) matching with a learned projection; Wang et al.,
"MiniLM" (2020) for self-attention distribution transfer.

>>> s, t = jnp.zeros((4, 10)), jnp.ones((4, 10))
>>> float(soft_target_loss(s, t, temperature=2.0))   # same distribution -> 0
0.0
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxshrink.errors import InvalidTypeError, InvalidValueError

TEMPERATURE_MESSAGE = (
  "`temperature` must be > 0; got {value!r}. Hinton et al. use 2-20; 1 leaves the teacher's "
  "distribution unchanged."
)


def check_temperature(temperature: float) -> None:
  """Raises ValueError for a non-positive (concrete) temperature."""
  if isinstance(temperature, jax.core.Tracer):
    return
  if not np.isfinite(float(temperature)) or float(temperature) <= 0:
    raise InvalidValueError(TEMPERATURE_MESSAGE.format(value=temperature))


def check_same_shape(student: jax.Array, teacher: jax.Array, what: str = "logits") -> None:
  """Raises ValueError when the student and teacher outputs differ in shape."""
  if tuple(student.shape) != tuple(teacher.shape):
    raise InvalidValueError(
      f"teacher and student {what} must have the same shape; got student {tuple(student.shape)} "
      f"and teacher {tuple(teacher.shape)}. Check both models predict the same classes/vocabulary "
      "and see the same batch."
    )


def _weights(mask: jax.Array | None, lead_shape: tuple[int, ...]) -> jax.Array:
  """float32 weights of shape `lead_shape` from a bool mask that is a prefix of it."""
  if mask is None:
    return jnp.ones(lead_shape, jnp.float32)
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise InvalidTypeError(
      f"`mask` must be a bool array (True = real token); got dtype {mask.dtype}."
    )
  if tuple(mask.shape) != tuple(lead_shape[: mask.ndim]):
    raise InvalidValueError(
      f"`mask` shape {tuple(mask.shape)} must be a prefix of the per-position shape "
      f"{tuple(lead_shape)}, e.g. (B,) or (B, T)."
    )
  mask = mask.reshape(mask.shape + (1,) * (len(lead_shape) - mask.ndim))
  return jnp.broadcast_to(mask, lead_shape).astype(jnp.float32)


def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean of per-position `values` over positions where `mask` is True (float32 `()`)."""
  values = values.astype(jnp.float32)
  weights = _weights(mask, tuple(values.shape))
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def soft_target_loss(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  *,
  temperature: float = 1.0,
  mask: jax.Array | None = None,
) -> jax.Array:
  """T² · KL(softmax(teacher / T) ‖ softmax(student / T)), from logits via log-softmax.

  The T² factor keeps the gradient scale of the soft term independent of T, so
  `alpha` means the same thing at every temperature (Hinton et al., §2).

  Args:
    student_logits: `(..., C)` float logits.
    teacher_logits: `(..., C)` float logits, same shape.
    temperature: softening temperature, > 0.
    mask: optional bool `(B,)` or `(B, T)` prefix of the leading dims.

  Returns:
    `()` float32 mean over valid positions.

  >>> soft_target_loss(jnp.zeros((2, 5, 7)), jnp.zeros((2, 5, 7)), temperature=4.0,
  ...                  mask=jnp.array([[1, 1, 1, 0, 0]] * 2, bool)).shape
  ()
  """
  check_temperature(temperature)
  check_same_shape(student_logits, teacher_logits)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  return temperature**2 * masked_mean(kl, mask)


def hard_target_loss(
  student_logits: jax.Array, labels: jax.Array, *, mask: jax.Array | None = None
) -> jax.Array:
  """Cross-entropy with integer labels; `(..., C)` logits, `(...)` int labels -> `()`."""
  if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
    raise InvalidValueError(
      f"`labels` shape {tuple(labels.shape)} must equal the logits' leading shape "
      f"{tuple(student_logits.shape[:-1])}."
    )
  nll = optax.softmax_cross_entropy_with_integer_labels(student_logits.astype(jnp.float32), labels)
  return masked_mean(nll, mask)


def kd_loss(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  labels: jax.Array | None,
  *,
  temperature: float = 4.0,
  alpha: float = 0.9,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Hinton's objective: `alpha · soft_target_loss + (1 - alpha) · hard_target_loss`.

  Args:
    student_logits, teacher_logits: `(..., C)`.
    labels: `(...)` int labels, or None for a purely soft objective (then alpha must be 1).
    temperature: > 0.
    alpha: weight of the soft term in [0, 1].
    mask: optional bool prefix mask.

  >>> kd_loss(jnp.zeros((3, 10)), jnp.zeros((3, 10)), jnp.array([1, 2, 3]), alpha=0.5).shape
  ()
  """
  check_alpha(alpha)
  soft = soft_target_loss(student_logits, teacher_logits, temperature=temperature, mask=mask)
  if labels is None:
    if not isinstance(alpha, jax.core.Tracer) and float(alpha) != 1.0:
      raise InvalidValueError(
        f"`alpha`={alpha} weighs a hard-label term but `labels` is None; pass labels or set "
        "alpha=1.0."
      )
    return soft
  return alpha * soft + (1.0 - alpha) * hard_target_loss(student_logits, labels, mask=mask)


def check_alpha(alpha: float) -> None:
  if isinstance(alpha, jax.core.Tracer):
    return
  if not 0.0 <= float(alpha) <= 1.0:
    raise InvalidValueError(
      f"`alpha` (weight of the soft-target term) must be in [0, 1]; got {alpha!r}. 0 trains on "
      "labels only, 1 on the teacher only."
    )


def logit_mse_loss(
  student_logits: jax.Array, teacher_logits: jax.Array, *, mask: jax.Array | None = None
) -> jax.Array:
  """Mean squared logit difference (Ba & Caruana), `(..., C)` each -> `()` float32."""
  check_same_shape(student_logits, teacher_logits)
  diff = student_logits.astype(jnp.float32) - teacher_logits.astype(jnp.float32)
  return masked_mean(jnp.mean(diff * diff, axis=-1), mask)


def init_projection(
  key: jax.Array, student_width: int, teacher_width: int, *, dtype=jnp.float32
) -> dict[str, jax.Array]:
  """A learned linear map student width -> teacher width for `feature_loss`.

  Returns:
    `{"kernel": (student_width, teacher_width), "bias": (teacher_width,)}`.

  >>> init_projection(jax.random.key(0), 64, 128)["kernel"].shape
  (64, 128)
  """
  for name, width in (("student_width", student_width), ("teacher_width", teacher_width)):
    if not isinstance(width, (int, np.integer)) or width < 1:
      raise InvalidValueError(f"`{name}` must be a positive int; got {width!r}.")
  scale = 1.0 / np.sqrt(student_width)
  kernel = jax.random.normal(key, (student_width, teacher_width), dtype) * scale
  return {"kernel": kernel, "bias": jnp.zeros((teacher_width,), dtype)}


def check_feature_pair(
  student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], projection: dict | None, name=""
) -> None:
  """Raises ValueError when the pair's widths cannot be matched by `projection`."""
  where = f" for feature pair `{name}`" if name else ""
  if tuple(student_shape[:-1]) != tuple(teacher_shape[:-1]):
    raise InvalidValueError(
      f"feature matching{where} needs the same leading (batch, token) shape; got student "
      f"{tuple(student_shape)} and teacher {tuple(teacher_shape)}. Only the last (width) axis can "
      "be projected; pick layers with the same sequence length, or pool them first."
    )
  ds, dt = student_shape[-1], teacher_shape[-1]
  if projection is None:
    if ds != dt:
      raise InvalidValueError(
        f"feature matching{where}: student width {ds} != teacher width {dt} and no projection "
        "was given. Pass `projection=init_projection(key, {ds}, {dt})` (trained with the student)."
      )
    return
  kernel_shape = tuple(projection["kernel"].shape)
  if kernel_shape != (ds, dt):
    raise InvalidValueError(
      f"feature matching{where}: projection kernel has shape {kernel_shape} but must map the "
      f"student width {ds} to the teacher width {dt}, i.e. ({ds}, {dt}). Rebuild it with "
      f"`init_projection(key, {ds}, {dt})`."
    )


def feature_loss(
  student_features: jax.Array,
  teacher_features: jax.Array,
  *,
  projection: dict | None = None,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Hint loss: MSE between `student @ W + b` and the teacher's features.

  Args:
    student_features: `(..., Ds)` hidden states, e.g. `(B, T, Ds)` or `(B, Ds)`.
    teacher_features: `(..., Dt)`, same leading shape.
    projection: `init_projection(key, Ds, Dt)` params when `Ds != Dt` (or to learn a map anyway).
    mask: optional bool `(B,)` / `(B, T)`.

  Returns:
    `()` float32 mean over valid positions of the mean squared error over the width.

  >>> p = init_projection(jax.random.key(0), 8, 16)
  >>> feature_loss(jnp.ones((2, 3, 8)), jnp.ones((2, 3, 16)), projection=p).shape
  ()
  """
  check_feature_pair(student_features.shape, teacher_features.shape, projection)
  s = student_features.astype(jnp.float32)
  if projection is not None:
    s = s @ projection["kernel"].astype(jnp.float32) + projection["bias"].astype(jnp.float32)
  diff = s - teacher_features.astype(jnp.float32)
  return masked_mean(jnp.mean(diff * diff, axis=-1), mask)


def attention_transfer_loss(
  student_attention: jax.Array,
  teacher_attention: jax.Array,
  *,
  mask: jax.Array | None = None,
  eps: float = 1e-12,
) -> jax.Array:
  """MiniLM attention transfer: KL(teacher ‖ student) of each query's attention row.

  Args:
    student_attention: `(B, H, Tq, Tk)` attention probabilities (rows sum to 1).
    teacher_attention: same shape (heads must match; average or pick heads first).
    mask: optional bool `(B, T)` key/query padding mask (`Tq == Tk == T`) or `(B,)`; padded
      queries are skipped and padded keys dropped from every row.
    eps: floor inside the logs; probabilities are not renormalised.

  Returns:
    `()` float32 mean over heads and valid queries.

  >>> a = jax.nn.softmax(jnp.zeros((2, 4, 5, 5)), -1)
  >>> float(attention_transfer_loss(a, a))
  0.0
  """
  check_same_shape(student_attention, teacher_attention, "attention maps")
  if student_attention.ndim != 4:
    raise InvalidValueError(
      f"attention maps must be (B, H, Tq, Tk); got shape {tuple(student_attention.shape)}."
    )
  s = student_attention.astype(jnp.float32)
  t = teacher_attention.astype(jnp.float32)
  terms = t * (jnp.log(jnp.maximum(t, eps)) - jnp.log(jnp.maximum(s, eps)))
  b, h, tq, tk = s.shape
  if mask is not None and jnp.ndim(mask) == 2:
    if tuple(jnp.shape(mask)) != (b, tk) or tq != tk:
      raise InvalidValueError(
        f"a token `mask` for attention maps must be (B, T) = {(b, tk)} with Tq == Tk; got "
        f"{tuple(jnp.shape(mask))} for maps {tuple(s.shape)}."
      )
    terms = jnp.where(mask[:, None, None, :], terms, 0.0)
    per_query = jnp.sum(terms, axis=-1)  # (B, H, Tq)
    weights = jnp.broadcast_to(mask[:, None, :], per_query.shape).astype(jnp.float32)
    return jnp.sum(per_query * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  return masked_mean(jnp.sum(terms, axis=-1), mask)


def cosine_embedding_loss(
  student_embeddings: jax.Array,
  teacher_embeddings: jax.Array,
  *,
  mask: jax.Array | None = None,
  eps: float = 1e-8,
) -> jax.Array:
  """`1 - cos(student, teacher)` along the last axis, `(..., D)` each -> `()` float32.

  >>> float(cosine_embedding_loss(jnp.ones((2, 3)), 2 * jnp.ones((2, 3))))
  0.0
  """
  check_same_shape(student_embeddings, teacher_embeddings, "embeddings")
  s = student_embeddings.astype(jnp.float32)
  t = teacher_embeddings.astype(jnp.float32)
  # max(|s| |t|, eps) from the squared norms: the gradient of a norm is 0/0 at a zero vector,
  # and a zero row (a padded position, a dead unit) must give a zero gradient, not NaN.
  squared = jnp.sum(s * s, axis=-1) * jnp.sum(t * t, axis=-1)
  cos = jnp.sum(s * t, axis=-1) * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))
  return masked_mean(1.0 - cos, mask)
