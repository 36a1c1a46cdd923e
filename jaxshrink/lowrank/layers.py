"""Running factorized kernels as two matmuls, so the compute really drops.

Two ways:

- `lowrank_apply(apply_fn)` wraps any model's pure `apply(params, x)` so it
  takes a compressed tree and computes every `LowRank` kernel's matmul as
  `(x @ a) @ b` and every `LowRank` conv as a conv with `a` (r output
  channels) followed by a 1x1 projection with `b`. It replays the model's
  jaxpr (as `capture.collect` does) and substitutes the ops whose operand is a
  factored kernel; linen, nnx or plain functions alike, no model edits.
- `LowRankDense` (linen) and `LowRankLinear` (nnx): factored layers to build
  or train a low-rank model directly.

>>> fast = jax.jit(lowrank_apply(model.apply))
>>> logits = fast(factorize(params, ".*dense1/kernel", rank=32), x)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxshrink.capture import _Replay
from jaxshrink.encoding import is_encoding, materialize
from jaxshrink.errors import InvalidValueError
from jaxshrink.lowrank.encoding import LowRank
from jaxshrink.tree import path_string


def _dot_two_matmuls(eqn, invals, in_src, encodings):
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  if lb or rb:
    return None
  for w_index, w_contract, x_contract in ((1, rc, lc), (0, lc, rc)):
    enc = encodings.get(in_src[w_index])
    if enc is None or in_src[1 - w_index] in encodings:
      continue
    w, x = invals[w_index], invals[1 - w_index]
    order = np.argsort(w_contract)
    if tuple(w.shape) != enc.shape or tuple(int(w_contract[i]) for i in order) != enc.contract_dims:
      return None  # the kernel was reshaped or contracted differently: compute it densely
    x_sorted = [int(x_contract[i]) for i in order]
    x_free = [d for d in range(x.ndim) if d not in x_sorted]
    w_free_shape = [w.shape[d] for d in range(w.ndim) if d not in enc.contract_dims]
    k, n = enc.matrix_shape
    xt = jnp.transpose(x, x_free + x_sorted).reshape(*[x.shape[d] for d in x_free], k)
    a, b = enc.factors()
    pet = eqn.params.get("preferred_element_type")
    precision = eqn.params.get("precision")
    t = jnp.matmul(xt, a.astype(xt.dtype), precision=precision, preferred_element_type=pet)
    y = jnp.matmul(t, b.astype(t.dtype), precision=precision, preferred_element_type=pet)
    y = y.reshape(*[x.shape[d] for d in x_free], *w_free_shape)
    if w_index == 0:  # dot_general puts the lhs's free dims first
      nx = len(x_free)
      y = jnp.transpose(y, tuple(range(nx, y.ndim)) + tuple(range(nx)))
    return [y.astype(eqn.outvars[0].aval.dtype)]
  return None


def _conv_two_stages(eqn, invals, in_src, encodings):
  enc = encodings.get(in_src[1])
  params = eqn.params
  if enc is None or params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
    return None
  lhs, w = invals
  _, rhs_spec, out_spec = params["dimension_numbers"]
  contract = tuple(d for d in range(w.ndim) if d != rhs_spec[0])
  if tuple(w.shape) != enc.shape or contract != enc.contract_dims:
    return None
  a, b = enc.factors()
  a_kernel = a.reshape(*[w.shape[d] for d in contract], enc.rank)
  a_kernel = jnp.moveaxis(a_kernel, -1, rhs_spec[0]).astype(w.dtype)
  bind = eqn.primitive.get_bind_params(params)
  with eqn.ctx.manager:
    t = eqn.primitive.bind(lhs, a_kernel, **bind)
  y = jnp.moveaxis(t, out_spec[1], -1)
  y = jnp.matmul(y, b.astype(y.dtype), precision=params.get("precision"))
  return [jnp.moveaxis(y, -1, out_spec[1]).astype(eqn.outvars[0].aval.dtype)]


def lowrank_apply(apply_fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
  """Wraps `apply(params, x)` to run a compressed tree's `LowRank` kernels factored.

  Other encodings in the tree are decoded as usual. A `LowRank` kernel that the
  model reshapes before use, or uses twice, is computed densely instead
  (still correct, no saving).

  Args:
    apply_fn: the model's pure `(params, x) -> outputs`.

  Returns:
    `apply(ctree, x)`; call it under `jax.jit`. `ctree` is a param tree or a whole linen
    variable dict (`params` next to `batch_stats`).
  """

  def apply(ctree: Any, x: Any) -> Any:
    # Paths over the whole tree, so a linen variable dict (`params` with `batch_stats`) works.
    flat = jax.tree_util.tree_flatten_with_path(ctree, is_leaf=is_encoding)[0]
    encodings = {path_string(kp): leaf for kp, leaf in flat if isinstance(leaf, LowRank)}
    # Materialized kernels are fed where the model expects them; XLA drops the product
    # `a @ b` as dead code wherever the factored ops replace its consumer.
    dense = materialize(ctree)
    keyed, treedef = jax.tree_util.tree_flatten_with_path(dense)
    paths = [path_string(kp) for kp, _ in keyed]
    leaves = [leaf for _, leaf in keyed]
    if not encodings:
      return apply_fn(dense, x)
    closed = jax.make_jaxpr(lambda lv, x: apply_fn(jax.tree.unflatten(treedef, lv), x))(leaves, x)
    out_tree = jax.tree.structure(jax.eval_shape(apply_fn, dense, x))

    def substitute(eqn, invals, in_src):
      if eqn.primitive.name == "dot_general":
        return _dot_two_matmuls(eqn, invals, in_src, encodings)
      if eqn.primitive.name == "conv_general_dilated":
        return _conv_two_stages(eqn, invals, in_src, encodings)
      return None

    x_leaves = jax.tree.leaves(x)
    origin = [p if p in encodings else None for p in paths] + [None] * len(x_leaves)
    replay = _Replay(set(), {}, {}, substitute=substitute)
    outs, _ = replay.run(closed.jaxpr, closed.consts, [*leaves, *x_leaves], origin)
    return jax.tree.unflatten(out_tree, outs)

  return apply


class LowRankDense(nn.Module):
  """Linen Dense with a factored kernel: `y = (x @ a) @ b + bias`.

  Attributes:
    features: output width N.
    rank: inner width r; `r (K + N)` kernel params instead of `K N`.
    use_bias: add a bias.
    dtype: computation dtype (None = the input's); params are float32.

  >>> y, _ = LowRankDense(16, rank=4).init_with_output(jax.random.key(0), jnp.ones((2, 32)))
  >>> y.shape
  (2, 16)
  """

  features: int
  rank: int
  use_bias: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = x.shape[-1]
    if not 1 <= self.rank <= min(k, self.features):
      raise InvalidValueError(f"`rank`={self.rank} must be in [1, min({k}, {self.features})].")
    init = nn.initializers.lecun_normal()
    # Scale each factor so the product has lecun_normal's variance.
    a = self.param("a", init, (k, self.rank), jnp.float32)
    b = self.param(
      "b", nn.initializers.normal(1.0 / np.sqrt(self.rank)), (self.rank, self.features)
    )
    dtype = self.dtype or x.dtype
    y = (x.astype(dtype) @ a.astype(dtype)) @ b.astype(dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(dtype)
    return y


class LowRankLinear(nnx.Module):
  """NNX Linear with a factored kernel: `y = (x @ a) @ b + bias`.

  >>> layer = LowRankLinear(32, 16, rank=4, rngs=nnx.Rngs(0))
  >>> layer(jnp.ones((2, 32))).shape
  (2, 16)
  """

  def __init__(
    self, in_features: int, out_features: int, *, rank: int, rngs: nnx.Rngs, use_bias: bool = True
  ):
    if not 1 <= rank <= min(in_features, out_features):
      raise InvalidValueError(f"`rank`={rank} must be in [1, min({in_features}, {out_features})].")
    key_a, key_b = jax.random.split(rngs.params())
    self.a = nnx.Param(nn.initializers.lecun_normal()(key_a, (in_features, rank)))
    self.b = nnx.Param(jax.random.normal(key_b, (rank, out_features)) / np.sqrt(rank))
    self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None

  @classmethod
  def from_encoding(
    cls, enc: LowRank, bias: jax.Array | None = None, *, rngs: nnx.Rngs | None = None
  ) -> LowRankLinear:
    """The layer holding a Dense kernel's `LowRank` factors (and its bias)."""
    k, n = enc.matrix_shape
    layer = cls(k, n, rank=enc.rank, rngs=rngs or nnx.Rngs(0), use_bias=bias is not None)
    a, b = enc.factors()
    layer.a[...], layer.b[...] = a, b
    if bias is not None:
      layer.bias[...] = jnp.asarray(bias)
    return layer

  def __call__(self, x: jax.Array) -> jax.Array:
    y = (x @ self.a[...].astype(x.dtype)) @ self.b[...].astype(x.dtype)
    return y if self.bias is None else y + self.bias[...].astype(x.dtype)
