"""Quantization-aware training inside the user's own loop, then `quantize_params` to `QArray`s.

`qat_apply(apply_fn, rule, spec)` returns an apply function with the same signature whose
selected kernels (rules choose them, by path, in any linen/nnx model, convs included) are
fake-quantized with a straight-through estimator; with `activation_bits` their input
activations are fake-quantized per token too. `mode="int"` runs the selected Dense matmuls as
int8 x int8 -> int32 in the forward pass with a float straight-through backward. The optimizer
and the loop stay the user's:

>>> qapply = qat_apply(model.apply, ".*kernel", QuantSpec(bits=4))
>>> loss = lambda p, x, y: cross_entropy_loss(qapply(p, x), y)   # your loop, your optax
>>> ctree = quantize_params(trained, ".*kernel", QuantSpec(bits=4))  # QArray params

Layers with an injectable hook can instead take `QuantDotGeneral` / `QuantConv` directly, or
AQT's `AqtDotGeneral` (`jaxshrink.quant.aqt_interop.aqt_dot_general`).

Layers stacked by `nn.scan` / `nnx.scan` are followed into the loop: each layer's slice of a
stacked kernel is fake-quantized with its own scales (per layer, as `ptq` stores them); kernels
in `cond` branches and `while` bodies are quantized too. A selected kernel the replay cannot
follow to its matmul raises `ControlFlowError` naming it and the primitive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxshrink.capture import ControlFlowError, kernel_matrix, replay_with
from jaxshrink.errors import InvalidValueError
from jaxshrink.quant import numerics
from jaxshrink.quant.dot_general import fake_quant_sym, int_dot_ste, ste
from jaxshrink.quant.ptq import LayerQuant, Overrides, resolve_layers
from jaxshrink.quant.qarray import from_matrix
from jaxshrink.quant.spec import QuantSpec
from jaxshrink.tree import Rule, params_of, path_string

QAT_MODES = ("fake", "int", "int_full")


def fake_quant_kernel(w: jax.Array, spec: QuantSpec, contract_dims, path: str = "<array>"):
  """Fake-quantized kernel (any granularity) with a straight-through gradient."""
  w2d = kernel_matrix(w, tuple(contract_dims))
  fq = from_matrix(numerics.fake_quant(lax.stop_gradient(w2d), spec, path=path), w.shape,
                   tuple(contract_dims))  # fmt: skip
  return ste(w, fq.astype(w.dtype))


def _leaf_paths(params: Any) -> list[str]:
  inner = params_of(params)
  prefix = len("params/") if inner is not params else 0
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return [path_string(kp)[prefix:] for kp, _ in leaves]


def qat_apply(
  apply_fn: Callable[..., Any],
  rule: Rule | str,
  spec: QuantSpec | LayerQuant,
  *,
  overrides: Overrides = (),
  mode: str = "fake",
) -> Callable[..., Any]:
  """`apply(params, *args)` with the selected kernels fake-quantized (STE).

  Args:
    apply_fn: the model's pure apply.
    rule: which kernels (paths), e.g. `".*kernel"` or `"dense.*kernel"`.
    spec: weight spec, or `LayerQuant(spec, activation_bits)` to also quantize activations.
    overrides: per-rule settings (None keeps a layer float).
    mode: `fake` (float math), `int` (int8 forward, float STE backward) or `int_full` (int8
      forward and backward); integer modes apply to 8-bit per-channel Dense layers.

  Kernels stacked by `nn.scan` / `nnx.scan` are fake-quantized one layer at a time inside the
  scan (each layer's own scales), and `cond` / `while` bodies are followed.

  Raises:
    ControlFlowError: (when the returned apply is traced) a selected kernel never reaches a
      matmul or conv the replay can follow, e.g. a layer of an already sliced stack; the
      message names the leaf and the primitive.
  """
  if mode not in QAT_MODES:
    raise InvalidValueError(f"QAT `mode` must be one of {list(QAT_MODES)}; got {mode!r}.")
  base = spec if isinstance(spec, LayerQuant) else LayerQuant(spec)
  # Keyed by the treedef itself (hashable, equal for equal structures) and the leaf shapes
  # (rules may select by rank or size): an `id()` of the temporary treedef is reused once it
  # is freed, handing one tree another tree's selection. The rule, spec and overrides are
  # fixed per `qat_apply` call (this cache lives in its closure), so they need no key.
  cache: dict[Any, dict[str, LayerQuant]] = {}

  def apply(params, *args):
    leaves, treedef = jax.tree.flatten(params)
    key = (treedef, tuple(tuple(getattr(leaf, "shape", ())) for leaf in leaves))
    if key not in cache:
      cache[key] = resolve_layers(params, rule, base, overrides)
    layers = cache[key]
    paths = {i: p for i, p in enumerate(_leaf_paths(params)) if p in layers}

    substituted: set[str] = set()

    def substitute(eqn, invals, in_src):
      name = eqn.primitive.name
      if name not in ("dot_general", "conv_general_dilated"):
        return None
      w_index = 1 if in_src[1] in layers else 0 if in_src[0] in layers else None
      if w_index is None or in_src[1 - w_index] in layers:
        return None
      layer = layers[in_src[w_index]]
      substituted.add(str(in_src[w_index]))
      invals = list(invals)
      x, w = invals[1 - w_index], invals[w_index]
      if name == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        w_contract, x_contract = (rc, lc) if w_index == 1 else (lc, rc)
        integer = (
          mode != "fake" and w_index == 1 and not lb and layer.spec.bits == 8
          and layer.activation_bits == 8 and layer.spec.group_size is None
        )  # fmt: skip
        if integer:
          dims = eqn.params["dimension_numbers"]
          out = int_dot_ste(x, w, dims, lhs_bits=8, rhs_bits=8, full=mode == "int_full")
          return [out.astype(eqn.outvars[0].aval.dtype)]
        x_axes = tuple(x_contract)
      else:
        dn = eqn.params["dimension_numbers"]
        w_contract = tuple(d for d in range(w.ndim) if d != dn.rhs_spec[0])
        x_axes = tuple(d for d in range(x.ndim) if d != dn.lhs_spec[0])
      invals[w_index] = fake_quant_kernel(w, layer.spec, sorted(w_contract), in_src[w_index])
      if layer.activation_bits is not None:
        invals[1 - w_index] = fake_quant_sym(x, x_axes, layer.activation_bits)
      out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      return out if eqn.primitive.multiple_results else [out]

    unfollowed: dict[str, str] = {}
    out = replay_with(apply_fn, params, args, paths, substitute, unfollowed=unfollowed)
    lost = {p: op for p, op in unfollowed.items() if p not in substituted}
    if lost:
      raise ControlFlowError(
        "QAT cannot follow "
        + ", ".join(f"`{p}` (through `{op}`)" for p, op in sorted(lost.items()))
        + " to a matmul or conv, so it would train in float. Feed the kernel to its matmul "
        "directly (casts, reshapes, `scan` over stacked layers, `cond` and `while` are "
        "followed), or exclude it from the rule."
      )
    return out

  return apply


@dataclasses.dataclass(frozen=True)
class QATResult:
  params: Any  # float params after QAT
  losses: np.ndarray  # (steps,) float32 training loss


def qat_finetune(
  apply_fn: Callable[..., Any],
  params: Any,
  x_train: np.ndarray,
  y_train: np.ndarray,
  rule: Rule | str,
  spec: QuantSpec | LayerQuant,
  *,
  steps: int = 200,
  learning_rate: float = 1e-3,
  batch_size: int = 64,
  overrides: Overrides = (),
  mode: str = "fake",
  key: jax.Array | None = None,
  optimizer: optax.GradientTransformation | None = None,
) -> QATResult:
  """A minimal QAT loop (cross-entropy; Adam at `learning_rate` unless `optimizer` is given)
  for recipes and benchmarks.

  Your own loop works the same way: use `qat_apply(...)` in the loss.
  """
  from jaxshrink.models import task_loss

  if steps < 1:
    raise InvalidValueError(f"QAT `steps` must be >= 1; got {steps}.")
  qapply = qat_apply(apply_fn, rule, spec, overrides=overrides, mode=mode)
  opt = optax.adam(learning_rate) if optimizer is None else optimizer
  x_all, y_all = jnp.asarray(x_train), jnp.asarray(y_train)

  @jax.jit
  def step(p, state, idx):
    loss, grads = jax.value_and_grad(lambda p: task_loss(qapply(p, x_all[idx]), y_all[idx]))(p)
    updates, state = opt.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss

  key = jax.random.key(0) if key is None else key
  state = opt.init(params)
  losses = []
  for i in range(steps):
    idx = jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0, x_all.shape[0])
    params, state, loss = step(params, state, idx)
    losses.append(loss)
  return QATResult(params=params, losses=np.asarray(jnp.stack(losses), np.float32))
