"""`recover`: distill the float model back into a compressed tree without undoing its compression.

Every leaf of the compressed tree gets a float32 *shadow* that the optimizer trains, and a
decode that turns the shadow back into the dense weight the model sees, through the leaf's own
compression:

- `BitmaskSparse` / `NMSparse`: the shadow holds the kept values only, so the structure (bits,
  N:M indices) is never touched and every pruned weight stays exactly zero; a kept slot that held
  an exact zero stays zero too. Quantized values (`QArray`) are fake-quantized as below.
- `QArray`: quantization-aware training on the stored grid. The shadow starts at the dequantized
  weight (times `input_scale`, the matrix the codes encode) and the forward pass rounds it with the
  stored scales and zero points, with a straight-through gradient. The scales stay fixed: they
  were chosen with the codes by the method that made them (GPTQ, AWQ and SmoothQuant calibrate
  scales, input scales and static activation scales together), the export and serving kernels
  read them as they are, and recovery moves weights by far less than a quantization step's range,
  so recomputing min/max scales would mostly reproduce them while shifting codes the loss never
  asked to move. At the end the shadow is re-quantized with the same scales: same spec, same
  layout, every code on the stored grid, `act_bits` / `act_scale` / `input_scale` kept.
- `LowRank`: the factors `a`, `b` train (fake-quantized when they are `QArray`s); the rank stays.
  The model runs them as two thin matmuls (`lowrank_apply`), forward and backward.
- `Cast`: trains in float32 through a fake cast to the storage dtype, re-cast at the end.
- Plain float leaves (biases, norms, kernels no stage touched) train as they are.

Frozen: embedding tables stored for lookup (`QArray(table=True)`), integer leaves, encodings of
another kind, and whatever the caller's `Rule` leaves out (by default, float embedding tables:
their rows get gradients only for the tokens a batch holds). The loss is a
`jaxshrink.distill.DistillLoss` between the compressed model and the float teacher, whose outputs
are kept after an example's first read and reused in later epochs (`transfer.TeacherCache`).

>>> result = recover(model.apply, ctree, model.apply, float_params, x_transfer,
...                  loss=DistillLoss(kd=0.0, logit_cosine=1.0), steps=300)
>>> result.tree                                   # same encodings, masks, grids and ranks
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxshrink.capture import kernel_matrix, token_mask
from jaxshrink.cast import Cast
from jaxshrink.distill.objective import DistillLoss, model_outputs
from jaxshrink.distill.train import batch_indices, student_optimizer
from jaxshrink.encoding import Encoding, is_encoding, materialize
from jaxshrink.errors import InvalidTypeError, InvalidValueError
from jaxshrink.lowrank.encoding import LowRank
from jaxshrink.lowrank.layers import lowrank_apply
from jaxshrink.quant import numerics, packing
from jaxshrink.quant.dot_general import ste
from jaxshrink.quant.qarray import QArray, from_matrix
from jaxshrink.recover.transfer import CACHE_BYTES, TeacherCache, cut_to_longest, token_batches
from jaxshrink.sparsity.encodings import BitmaskSparse, NMSparse
from jaxshrink.tree import Rule, path_string

SPARSE = (BitmaskSparse, NMSparse)


def _is_float_array(x: Any) -> bool:
  if isinstance(x, Encoding) or not hasattr(x, "dtype"):
    return False
  return bool(jnp.issubdtype(x.dtype, jnp.floating))


def frozen_reason(leaf: Any) -> str | None:
  """Why a leaf cannot train (None when it can): a lookup table, an integer or unknown leaf."""
  if isinstance(leaf, QArray):
    return "quantized lookup table" if leaf.table else None
  if isinstance(leaf, SPARSE):
    return frozen_reason(leaf.values)
  if isinstance(leaf, LowRank):
    return frozen_reason(leaf.a) or frozen_reason(leaf.b)
  if isinstance(leaf, Cast):
    return None
  if isinstance(leaf, Encoding):
    return f"`{leaf.name}` encoding"
  if _is_float_array(leaf):
    return None
  return f"{getattr(leaf, 'dtype', type(leaf).__name__)} leaf"


def init_shadow(leaf: Any) -> Any:
  """The float32 trainable view of a trainable leaf (see the module docstring)."""
  if isinstance(leaf, QArray):
    return leaf.dequantized_matrix(with_input_scale=False).astype(jnp.float32)
  if isinstance(leaf, SPARSE):
    return {"values": init_shadow(leaf.values)}
  if isinstance(leaf, LowRank):
    return {"a": init_shadow(leaf.a), "b": init_shadow(leaf.b)}
  if isinstance(leaf, Cast):
    return leaf.values.astype(jnp.float32)
  return jnp.asarray(leaf, jnp.float32)


def _on_grid(w2d: jax.Array, q: QArray) -> jax.Array:
  """`w2d` rounded to `q`'s stored grid (fixed scales), straight-through gradient."""
  codes = numerics.quantize_codes(w2d, q.scale, q.zero_point, q.spec)
  return ste(w2d, numerics.dequantize_codes(codes, q.scale, q.zero_point, q.spec))


def _qarray_dense(shadow: jax.Array, q: QArray) -> jax.Array:
  if q.layers is not None:  # a stacked kernel: each layer with its own scales
    return jax.vmap(_qarray_dense)(shadow, q._layer_template())
  w = _on_grid(shadow, q)
  if q.input_scale is not None:
    w = w / q.input_scale[:, None]
  return from_matrix(w, q.shape, q.contract_dims).astype(q.dtype)


def _kept_slots(values: Any) -> jax.Array:
  """True where a sparse leaf stores a nonzero value; an exactly-zero slot stays zero."""
  return materialize(values) != 0


def decode(shadow: Any, leaf: Any, *, factored: bool = False) -> Any:
  """The dense weight the model sees: `shadow` through `leaf`'s compression (jit/grad-able).

  A frozen leaf (`shadow` None) decodes as it is stored. With `factored`, a `LowRank` leaf stays
  a `LowRank` of its decoded factors, for an apply wrapped in `lowrank_apply`.
  """
  if shadow is None:
    if factored and isinstance(leaf, LowRank):
      return leaf
    return leaf.materialize() if isinstance(leaf, Encoding) else leaf
  if isinstance(leaf, QArray):
    return _qarray_dense(shadow, leaf)
  if isinstance(leaf, SPARSE):
    values = decode(shadow["values"], leaf.values)
    values = jnp.where(_kept_slots(leaf.values), values, jnp.zeros((), values.dtype))
    return dataclasses.replace(leaf, values=values).materialize()
  if isinstance(leaf, LowRank):
    a, b = decode(shadow["a"], leaf.a), decode(shadow["b"], leaf.b)
    factors = dataclasses.replace(leaf, a=a, b=b)
    return factors if factored else factors.materialize()
  if isinstance(leaf, Cast):
    rounded = shadow.astype(leaf.values.dtype).astype(jnp.float32)
    return ste(shadow, rounded).astype(leaf.dtype)
  return shadow.astype(leaf.dtype)


def _store_codes(codes: jax.Array, q: QArray) -> jax.Array:
  if q.format != "int":
    return codes.astype(q.codes.dtype)
  if q.bits == 8:
    return codes.astype(jnp.int8)
  return packing.pack_codes(codes, bits=q.bits, qmin=q.spec.qmin)


def _requantize(shadow: jax.Array, q: QArray) -> QArray:
  if q.layers is not None:
    per_layer = [_requantize(shadow[i], q[i]).codes for i in range(q.layers)]
    return dataclasses.replace(q, codes=jnp.stack(per_layer))
  codes = numerics.quantize_codes(shadow, q.scale, q.zero_point, q.spec)
  return dataclasses.replace(q, codes=_store_codes(codes, q))


def reencode(shadow: Any, leaf: Any) -> Any:
  """`leaf` with its trained values: same encoding, structure, spec, scales and rank."""
  if shadow is None:
    return leaf
  if isinstance(leaf, QArray):
    return _requantize(shadow, leaf)
  if isinstance(leaf, SPARSE):
    keep = _kept_slots(leaf.values)
    values = shadow["values"]
    if isinstance(leaf.values, QArray):
      # Zero slots re-quantize from an exact 0, which every stored grid holds.
      mask = kernel_matrix(keep, leaf.values.contract_dims)
      values = _requantize(jnp.where(mask, values, 0.0), leaf.values)
      return dataclasses.replace(leaf, values=values)
    dense = jnp.where(keep, values, 0.0).astype(np.dtype(leaf.values.dtype))
    return dataclasses.replace(leaf, values=dense)
  if isinstance(leaf, LowRank):
    a, b = reencode(shadow["a"], leaf.a), reencode(shadow["b"], leaf.b)
    return dataclasses.replace(leaf, a=a, b=b)
  if isinstance(leaf, Cast):
    return dataclasses.replace(leaf, values=shadow.astype(leaf.values.dtype))
  return shadow.astype(leaf.dtype)


@dataclasses.dataclass(frozen=True)
class RecoverResult:
  """What `recover` returns.

  Attributes:
    tree: the compressed tree with trained values, same encodings as the input.
    losses: `(steps,)` float32 training loss.
    trained: paths of the leaves that trained.
    frozen: path -> why that leaf stayed as it was.
    teacher_cache: whether the teacher's outputs were kept for reuse, and why not (`TeacherCache`).
  """

  tree: Any
  losses: np.ndarray
  trained: tuple[str, ...]
  frozen: dict[str, str]
  teacher_cache: str = "off: not asked"


@dataclasses.dataclass(frozen=True)
class TrainableView:
  """A compressed tree split into trainable shadows and the stored leaves they decode through.

  Attributes:
    paths: each leaf's path (`jaxshrink.tree` style), in flattening order.
    leaves: the stored leaves (arrays or `Encoding`s).
    treedef: the tree's structure with encodings as leaves.
    shadows: float32 shadow per leaf (see `init_shadow`), None for a frozen leaf.
    frozen: path -> why that leaf does not train.
  """

  paths: tuple[str, ...]
  leaves: tuple[Any, ...]
  treedef: Any
  shadows: tuple[Any, ...]
  frozen: dict[str, str]

  def dense(
    self, shadows: Sequence[Any], leaves: Sequence[Any] | None = None, *, factored: bool = False
  ) -> Any:
    """The dense param tree the model runs (inside `jit`, `leaves` passed as arguments).

    With `factored`, `LowRank` kernels stay factors (see `decode`).
    """
    leaves = self.leaves if leaves is None else leaves
    dense = [decode(s, leaf, factored=factored) for s, leaf in zip(shadows, leaves, strict=True)]
    return self.treedef.unflatten(dense)

  def encoded(self, shadows: Sequence[Any]) -> Any:
    """The compressed tree holding the trained values."""
    out = [reencode(s, leaf) for s, leaf in zip(shadows, self.leaves, strict=True)]
    return self.treedef.unflatten(out)


def trainable_view(tree: Any, rule: Rule | None = None) -> TrainableView:
  """Splits `tree` into shadows for the leaves `rule` selects that can train (see the module doc).

  Args:
    tree: a param tree, dense or compressed.
    rule: which leaves may train (by path); default every leaf.
  """
  rule = Rule(min_ndim=0) if rule is None else rule
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_encoding)
  paths = tuple(path_string(kp) for kp, _ in flat)
  leaves = tuple(leaf for _, leaf in flat)
  shadows, frozen = [], {}
  for path, leaf in zip(paths, leaves, strict=True):
    reason = frozen_reason(leaf)
    if reason is None and not rule.matches(path, leaf):
      reason = "left out by the stage's target/exclude"
    if reason is not None:
      frozen[path] = reason
    shadows.append(None if reason is not None else init_shadow(leaf))
  return TrainableView(paths, leaves, treedef, tuple(shadows), frozen)


def recover(
  apply: Callable[[Any, Any], Any],
  tree: Any,
  teacher_apply: Callable[[Any, Any], Any],
  teacher_params: Any,
  x_transfer: np.ndarray,
  *,
  loss: DistillLoss | None = None,
  steps: int = 300,
  learning_rate: float = 1e-4,
  batch_size: int = 32,
  rule: Rule | None = None,
  augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
  pad_id: int | None = None,
  teacher_cache: bool | str = "auto",
  key: jax.Array | None = None,
) -> RecoverResult:
  """Distills `teacher_apply` into the compressed `tree`, keeping its compression.

  Args:
    apply: the compressed model's `(dense params, x) -> outputs` (a dict with `logits` and
      tapped module outputs when `loss` has feature pairs: `jaxshrink.distill.tapped_apply`).
    tree: the compressed tree to recover.
    teacher_apply: the float model's apply, same output contract.
    teacher_params: its params (dense or compressed).
    x_transfer: `(N, ...)` transfer inputs; batches are drawn from fresh permutations.
    loss: the objective (default `DistillLoss(alpha=1.0)`: soft targets, no labels).
    steps, learning_rate, batch_size: Adam with cosine decay to 5% and clipping at norm 1.
    rule: which leaves may train (default: every leaf that can).
    augment: optional `(key, x) -> x` applied to each batch (the teacher sees the same one).
    pad_id: for `(N, T)` token ids padded with this id: batches group rows of similar length
      and are cut to their longest row (`token_batches`), rounded up to 8 tokens.
    teacher_cache: keep the teacher's outputs for each example the first time it is read and
      reuse them in later epochs (`jaxshrink.recover.transfer.TeacherCache`): "auto" when exact
      and within 4 GiB, True to insist (an error when it cannot be exact), False never.
    key: PRNG key for batch order and augmentation.

  Returns:
    `RecoverResult(tree, losses, trained, frozen)`.
  """
  loss = DistillLoss(alpha=1.0) if loss is None else loss
  if not isinstance(loss, DistillLoss):
    raise InvalidTypeError(f"`loss` must be a DistillLoss; got {type(loss).__name__}.")
  for name, value in (("steps", steps), ("batch_size", batch_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise InvalidValueError(f"`{name}` must be a positive int; got {value!r}.")
  if not learning_rate > 0:
    raise InvalidValueError(f"`learning_rate` must be > 0; got {learning_rate!r}.")
  if not (isinstance(teacher_cache, bool) or teacher_cache == "auto"):
    raise InvalidValueError(
      f"`teacher_cache` must be True, False or 'auto'; got {teacher_cache!r}."
    )
  x_all = np.asarray(x_transfer)
  if x_all.ndim < 1 or x_all.shape[0] == 0:
    raise InvalidValueError(f"`x_transfer` must hold at least one example; got {x_all.shape}.")
  key = jax.random.key(0) if key is None else key
  data_key, aug_key = jax.random.split(key)
  view = trainable_view(tree, rule)
  trained = tuple(p for p, s in zip(view.paths, view.shadows, strict=True) if s is not None)
  if not trained:
    raise InvalidValueError(
      "no leaf can train: every leaf is frozen (" + ", ".join(
        f"`{p}`: {r}" for p, r in list(view.frozen.items())[:4]) + "). Widen `target`."
    )  # fmt: skip
  optimizer = student_optimizer(learning_rate, steps)
  # Low-rank kernels train as their two thin matmuls, forward and backward: a rank-r kernel
  # costs r (K + N) multiply-adds per row instead of K N, so each step is cheaper.
  factored = any(isinstance(leaf, LowRank) for leaf in view.leaves)
  student = lowrank_apply(apply) if factored else apply
  loss_params = loss.init(
    jax.random.key(0),
    jax.eval_shape(lambda s, x: apply(view.dense(s), x), view.shadows, x_all[:1]),
    jax.eval_shape(lambda p, x: teacher_apply(materialize(p), x), teacher_params, x_all[:1]),
  )
  if loss_params:
    raise InvalidValueError(
      "recover matches outputs of equal width only; the feature pairs "
      f"{sorted(loss_params)} differ in width. Pair modules with the same output width."
    )

  def teacher_outputs(teacher_params, x):
    out = model_outputs(teacher_apply(materialize(teacher_params), x), "teacher")
    return jax.tree.map(jax.lax.stop_gradient, out)

  def train(shadows, opt_state, leaves, x, t_out):
    # Padding positions of token ids never count in a hidden-state loss.
    tokens = token_mask(x, pad_id) if loss.pairs else None
    feature_mask = None if tokens is None else tokens > 0

    def objective(s):
      s_out = model_outputs(student(view.dense(s, leaves, factored=factored), x), "student")
      return loss({}, s_out, t_out, None, feature_mask=feature_mask)[0]

    value, grads = jax.value_and_grad(objective)(shadows)
    updates, opt_state = optimizer.update(grads, opt_state, shadows)
    return optax.apply_updates(shadows, updates), opt_state, value

  def teacher_step(shadows, opt_state, leaves, teacher_params, x, index):
    if augment is not None:
      x = augment(jax.random.fold_in(aug_key, index), x)
    t_out = teacher_outputs(teacher_params, x)
    return (*train(shadows, opt_state, leaves, x, t_out), t_out)

  teacher_step = jax.jit(teacher_step, donate_argnums=(0, 1))
  cached_step = jax.jit(train, donate_argnums=(0, 1))
  shadows = jax.tree.map(lambda a: jnp.array(a, copy=True), list(view.shadows))
  opt_state = optimizer.init(shadows)
  leaves = list(view.leaves)
  seed = int(jax.random.randint(data_key, (), 0, np.iinfo(np.int32).max))
  tokens = pad_id is not None and x_all.ndim == 2
  if tokens:
    batches = token_batches(x_all, steps, batch_size, seed, pad_id=pad_id)
  else:
    batches = list(batch_indices(x_all.shape[0], steps, batch_size, seed))
  cache, cache_note = None, "off: not asked"
  if teacher_cache:
    cache, cache_note = TeacherCache.plan(
      functools.partial(teacher_outputs, teacher_params),
      x_all,
      reads=steps * batch_size,
      pad_id=pad_id if tokens else None,
      augmented=augment is not None,
      limit=CACHE_BYTES if teacher_cache == "auto" else 1 << 62,
    )
    if cache is None and teacher_cache is True:
      raise InvalidValueError(
        f"`teacher_cache=True` cannot keep this teacher's outputs ({cache_note}); pass "
        "`teacher_cache='auto'` to run the teacher in every step instead."
      )
  losses = []
  for i, index in enumerate(batches):
    batch = x_all[index]
    if tokens:
      batch = cut_to_longest(batch, pad_id)
    t_out = None if cache is None else cache.lookup(index, batch)
    if t_out is not None:
      shadows, opt_state, value = cached_step(shadows, opt_state, leaves, batch, t_out)
    else:
      shadows, opt_state, value, t_out = teacher_step(
        shadows, opt_state, leaves, teacher_params, batch, i
      )
      if cache is not None:
        cache.store(index, batch, t_out)
    losses.append(value)
  return RecoverResult(
    tree=view.encoded(shadows),
    losses=np.asarray(jnp.stack(losses), np.float32),
    trained=trained,
    frozen=dict(view.frozen),
    teacher_cache=cache_note,
  )
