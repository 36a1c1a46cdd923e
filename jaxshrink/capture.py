"""Calibration statistics of the inputs that meet each kernel in a matmul or conv.

Post-training methods (static activation scales, GPTQ/SparseGPT Hessians,
Wanda norms, AWQ and SmoothQuant channel scales) all need, for a kernel `W`,
statistics of the activations `X` that multiply it. Rather than asking users
to instrument their modules, `collect` traces the user's own apply function to
a jaxpr, finds every `dot_general` / `conv_general_dilated` whose operand is a
parameter leaf (directly or through a reshape, transpose or dtype cast), and
replays the jaxpr under `jit` recording reductions of the other operand. It
works for linen, nnx, or any pure `apply(params, x)`.

The activations reach each reducer as a matrix `x2d` of shape `(rows, K)`,
where `K` enumerates the kernel's contracting elements in the kernel's own
row-major order. So `x2d @ kernel_matrix(w, site.contract_dims)` is the layer's
output: a Dense kernel `(in, out)` gives `K = in`; a conv kernel
`(kh, kw, cin, cout)` gives `K = kh * kw * cin` from image patches.

Control flow is followed: a `scan`'s body is replayed with layer `i` of each stacked leaf
tagged, so layers stacked by `nn.scan` / `nnx.scan` (params with a leading layer axis) are
seen one layer at a time and get statistics per layer (a leading layer axis, `Site.layers`);
serving and QAT substitutions also reach into `cond` branches and `while` bodies. What cannot
be followed raises `ControlFlowError` naming the primitive and the leaf, so no kernel silently
stays float.

>>> found = collect(model.apply, params, batches, ".*kernel", {"absmax": absmax_reducer()})
>>> found.stats["Dense_0/kernel"]["absmax"].shape      # (in_features,)
>>> found.stats["ScanBlock_0/Dense_0/kernel"]["absmax"].shape      # (layers, in_features)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jaxshrink.encoding import is_encoding
from jaxshrink.errors import InvalidTypeError, JaxshrinkError
from jaxshrink.tree import (
  Rule,
  as_rule,
  flatten,
  flatten_to_store,
  has_other_collections,
  no_match_message,
)

# Ops a kernel may pass through on its way to the matmul without losing its identity.
_TRANSPARENT = {"convert_element_type", "copy", "copy_p", "reshape", "squeeze", "expand_dims"}
# Ops that move a kernel's elements around: `replay_with(..., layout_ops=LAYOUT_OPS)` tags
# their outputs `Derived`, so a substitute can tell a transposed kernel from the kernel itself.
LAYOUT_OPS = frozenset({"transpose", "rev", "slice", "dynamic_slice", "broadcast_in_dim", "pad"})
FOLLOWED_OPS = frozenset(_TRANSPARENT) | LAYOUT_OPS
# Call-like primitives whose body is inlined so provenance follows the kernel inside.
_CALLS = {
  "jit",
  "pjit",
  "closed_call",
  "core_call",
  "custom_jvp_call",
  "custom_vjp_call",
  "remat",
  "checkpoint",
}
# Ops whose kernel input the replay records (no note that it was not followed).
_RECORDED = frozenset({"dot_general", "conv_general_dilated"})
# Control flow the replay follows into its bodies (see `_Replay`): in a `scan`, a stacked
# leaf's layer `i` is `LayerSlice(path, i, layers)`; `cond` and `while` are replayed
# inside `lax.switch` / `lax.while_loop` with the substitution applied in every body.
CONTROL_FLOW = frozenset({"scan", "while", "cond"})


class ControlFlowError(JaxshrinkError):
  """A followed leaf meets control flow, or an op inside it, that the replay cannot follow."""


class LayerSlice(str):
  """Provenance of layer `index` of a leaf stacked on a leading layer axis of `layers`.

  `nn.scan` / `nnx.scan` feed each stacked param to the loop body one layer at a time; the
  replay tags layer `i` of leaf `path` with this (`i` an int where the loop is unrolled, a
  traced int32 scalar where it stays rolled). It equals (and hashes
  like) the plain path, so a substitute that looks kernels up by path finds it and works on
  the slice it is given; code that needs the layer (per-layer statistics, a stacked `QArray`)
  reads `index` and `layers`.

  >>> s = LayerSlice("blocks/kernel", 2, 4)
  >>> s == "blocks/kernel", s.index, s.layers
  (True, 2, 4)
  """

  index: int | jax.Array
  layers: int

  def __new__(cls, path: str, index: int, layers: int) -> LayerSlice:
    obj = super().__new__(cls, path)
    # A traced index inside a scan the replay keeps rolled (serving, QAT); else an int.
    obj.index = index if isinstance(index, jax.core.Tracer) else int(index)
    obj.layers = int(layers)
    return obj

  def __repr__(self) -> str:
    return f"LayerSlice({str(self)!r}, {self.index}, {self.layers})"


def split_source(src: Any) -> tuple[str | None, int | None]:
  """`(path, layer)` of a provenance: layer is None unless `src` is a `LayerSlice`."""
  if isinstance(src, Derived):
    src = src.path
  if not isinstance(src, str):
    return None, None
  return str(src), (src.index if isinstance(src, LayerSlice) else None)


@dataclasses.dataclass(frozen=True)
class Reducer:
  """A streaming statistic of the `(rows, K)` input matrix of a kernel.

  Attributes:
    init: `K -> state` (a pytree of arrays).
    update: `(state, x2d, weights) -> state`; traced inside `jit`. `weights` is `(rows,)`
      float32: 1 for a row that counts, 0 for a padding token's row (see `padding`), which
      must leave the statistic as it was. A two-argument `(state, x2d)` update is accepted
      too; it sees every row, padding included.
  """

  init: Callable[[int], Any]
  update: Callable[..., Any]

  def __post_init__(self):
    try:
      params = inspect.signature(self.update).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: called with three
      return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) == 2 and not any(p.kind == p.VAR_POSITIONAL for p in params):
      update = self.update
      object.__setattr__(self, "update", lambda state, x2d, weights: update(state, x2d))


def absmax_reducer() -> Reducer:
  """Per input channel max |x|, shape `(K,)`."""
  return Reducer(
    init=lambda k: jnp.zeros((k,), jnp.float32),
    update=lambda s, x, w: jnp.maximum(s, jnp.max(jnp.abs(x) * w[:, None], axis=0)),
  )


def minmax_reducer() -> Reducer:
  """Per input channel `(min, max)`, each shape `(K,)`."""
  return Reducer(
    init=lambda k: (jnp.full((k,), jnp.inf, jnp.float32), jnp.full((k,), -jnp.inf, jnp.float32)),
    update=lambda s, x, w: (
      jnp.minimum(s[0], jnp.where(w[:, None] > 0, x, jnp.inf).min(axis=0)),
      jnp.maximum(s[1], jnp.where(w[:, None] > 0, x, -jnp.inf).max(axis=0)),
    ),
  )


def sum_squares_reducer() -> Reducer:
  """Per input channel sum of x² and the row count; `sqrt(sum)` is Wanda's ‖x‖."""
  return Reducer(
    init=lambda k: (jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.float32)),
    update=lambda s, x, w: (s[0] + jnp.sum(x * x * w[:, None], axis=0), s[1] + jnp.sum(w)),
  )


def gram_reducer() -> Reducer:
  """`X^T X` summed over rows, shape `(K, K)` in float32, and the row count."""
  return Reducer(
    init=lambda k: (jnp.zeros((k, k), jnp.float32), jnp.zeros((), jnp.float32)),
    update=lambda s, x, w: (s[0] + (x * w[:, None]).T @ x, s[1] + jnp.sum(w)),
  )


_PAD_ID: contextvars.ContextVar[int | None] = contextvars.ContextVar("pad_id", default=None)


@contextlib.contextmanager
def padding(pad_id: int | None) -> Iterator[None]:
  """Leaves padding tokens out of every calibration statistic collected inside the block.

  Token batches `(B, T)` are padded to their longest row; the padding positions still run
  through the model, and their activations (a [PAD] embedding attending to the sentence) are
  nothing the model is ever asked to get right, so a Hessian, norm or scale that counts them
  is fitted partly to rows that do not matter. Inside `with padding(pad_id):`, `collect` weighs
  each row of a kernel's input whose leading dims are the batch's `(B, T)` by
  `x != pad_id`. The recipe stages run inside it with the model's `pad_id`. `None` counts
  every row.

  >>> with padding(0):
  ...   hessians = collect_hessians(model.apply, params, batches, ".*kernel")
  """
  if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)):
    raise InvalidTypeError(f"`pad_id` must be a token id (int) or None; got {pad_id!r}.")
  token = _PAD_ID.set(pad_id)
  try:
    yield
  finally:
    _PAD_ID.reset(token)


def token_mask(x: Any, pad_id: int | None) -> jax.Array | None:
  """`(B, T)` float32 1/0 for a batch of token ids (a 2-D integer array), else None."""
  if pad_id is None or not hasattr(x, "ndim") or x.ndim != 2:
    return None
  if not jnp.issubdtype(x.dtype, jnp.integer):
    return None
  return (x != pad_id).astype(jnp.float32)


def _row_weights(mask: jax.Array | None, free_shape: tuple[int, ...], rows: int) -> jax.Array:
  """Weights of the `rows` rows of an input whose rows enumerate `free_shape`: the batch's token
  mask where those dims start with the batch's `(B, T)` (or `B * T` flattened), else ones."""
  if mask is not None:
    if tuple(free_shape[:2]) == mask.shape:
      return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (len(free_shape) - 2)),
                              free_shape).reshape(-1)  # fmt: skip
    if free_shape[:1] == (mask.size,):
      return jnp.broadcast_to(mask.reshape((mask.size,) + (1,) * (len(free_shape) - 1)),
                              free_shape).reshape(-1)  # fmt: skip
  return jnp.ones((rows,), jnp.float32)


@dataclasses.dataclass(frozen=True)
class Derived:
  """Provenance of a value computed from the leaf at `path` by the layout op `op`.

  Never equal to a path string, so code that looks kernels up by path does not mistake, e.g.,
  `w.T` for `w`.
  """

  path: str
  op: str


@dataclasses.dataclass(frozen=True)
class Site:
  """Where a kernel is consumed.

  Attributes:
    path: the kernel's leaf path.
    op: `dot_general` or `conv`.
    contract_dims: the kernel's contracting dimensions (leading, in order); for a stacked
      leaf, those of one layer's kernel `leaf[i]`.
    k: number of contracting elements (the width of `x2d`).
    layers: None for a kernel used whole; for a leaf stacked on a leading layer axis and
      consumed one layer at a time inside a `scan` (`nn.scan`, `nnx.scan`), the number of
      layers. Its statistics then carry a leading axis of that length, one entry per layer.
  """

  path: str
  op: str
  contract_dims: tuple[int, ...]
  k: int
  layers: int | None = None

  def per_layer(self, leaf: Any) -> list[Any]:
    """`[leaf]` for a kernel used whole, or its `layers` slices `leaf[i]` for a stacked one."""
    return [leaf] if self.layers is None else [leaf[i] for i in range(self.layers)]


def layer_stats(stats: Any, site: Site) -> list[Any]:
  """One statistic of `collect` split per layer: `[stats]`, or `stats[i]` for a stacked site."""
  if site.layers is None:
    return [stats]
  return [jax.tree.map(lambda a, i=i: a[i], stats) for i in range(site.layers)]


def _init_state(reducer: Reducer, k: int, layers: int | None) -> Any:
  state = reducer.init(k)
  if layers is None:
    return state
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (layers, *jnp.shape(a))), state)


def kernel_matrix(kernel: jax.Array, contract_dims: tuple[int, ...]) -> jax.Array:
  """Views a kernel as `(K, N)`: contracting dims first, the rest flattened."""
  rest = tuple(d for d in range(kernel.ndim) if d not in contract_dims)
  k = int(np.prod([kernel.shape[d] for d in contract_dims]))
  return jnp.transpose(kernel, contract_dims + rest).reshape(k, -1)


def from_matrix(m: jax.Array, shape: tuple[int, ...], contract_dims: tuple[int, ...]) -> jax.Array:
  """Inverse of `kernel_matrix`: a `(K, N)` matrix back to the kernel's layout `shape`."""
  rest = tuple(d for d in range(len(shape)) if d not in contract_dims)
  order = tuple(contract_dims) + rest
  return jnp.transpose(m.reshape([shape[d] for d in order]), np.argsort(order))


def _read(env, var):
  return var.val if isinstance(var, jcore.Literal) else env[var]


def _dot_input_matrix(x, x_contract, x_batch):
  """Rows of the non-kernel operand, columns in the kernel's contracting order."""
  free = tuple(d for d in range(x.ndim) if d not in x_contract and d not in x_batch)
  x = jnp.transpose(x, tuple(x_batch) + free + tuple(x_contract))
  k = int(np.prod([x.shape[-i - 1] for i in range(len(x_contract))]))
  return x.reshape(-1, k)


def _conv_input_matrix(lhs, params, kernel_shape):
  """Image patches of a conv input, features ordered like the kernel's `(..., cin)`."""
  lhs_spec, rhs_spec, _ = params["dimension_numbers"]
  spatial = [kernel_shape[d] for d in rhs_spec[2:]]
  patches = lax.conv_general_dilated_patches(
    lhs,
    filter_shape=spatial,
    window_strides=params["window_strides"],
    padding=params["padding"],
    lhs_dilation=params["lhs_dilation"],
    rhs_dilation=params["rhs_dilation"],
    dimension_numbers=params["dimension_numbers"],
    precision=lax.Precision.HIGHEST,
  )
  # Patch features come out ordered (cin, *spatial) on the lhs feature axis.
  feat_axis = lhs_spec[1]
  patches = jnp.moveaxis(patches, feat_axis, -1)
  cin = lhs.shape[feat_axis] // params["feature_group_count"]
  patches = patches.reshape(-1, cin, *spatial)
  # Reorder to the kernel's own order of its contracting dims (e.g. HWIO -> kh, kw, cin).
  contract = sorted(rhs_spec[1:2] + rhs_spec[2:])
  order_in_patch = {rhs_spec[1]: 1, **{d: 2 + i for i, d in enumerate(rhs_spec[2:])}}
  patches = jnp.transpose(patches, (0, *[order_in_patch[d] for d in contract]))
  return patches.reshape(patches.shape[0], -1), tuple(contract)


# `substitute(eqn, invals, in_src) -> outvals | None`: computes one equation another way
# (an int8 dot for a quantized kernel, two matmuls for a low-rank one); None binds it as traced.
Substitute = Callable[[Any, list, list], Any]


class _Replay:
  """Evaluates a jaxpr, following param provenance and feeding reducers.

  Control flow is followed wherever an operand carries provenance: a `scan`'s body is replayed
  with a stacked leaf's layer `i` tagged `LayerSlice` (consts keep their plain provenance:
  weights shared by every iteration). The loop stays rolled with `i` traced (calibration
  carries its statistics through it and updates layer `i` of each), except in calibration's
  first, abstract pass, which unrolls it to find the sites. With a `substitute` (serving, QAT),
  `cond` replays every branch inside `lax.switch` and `while`
  its body inside `lax.while_loop`, substituting in each; calibration (reducers) cannot
  accumulate statistics inside them and raises `ControlFlowError` naming the leaf.
  """

  # Replay a `scan` one layer at a time with `i` a Python int (`_Rows`: rows are not carried).
  unrolls = False

  def __init__(
    self,
    selected: set[str],
    reducers: Mapping[str, Reducer],
    states: dict,
    substitute: Callable[[Any, list, list], list | None] | None = None,
    layout_ops: frozenset[str] = frozenset(),
    roll: bool = False,
    token_mask: jax.Array | None = None,
  ):
    self.selected = selected
    # `(B, T)` weights of the batch's tokens (`padding`): rows of a kernel input laid out as
    # the batch's tokens are weighted by it; None weighs every row 1.
    self.token_mask = token_mask
    # Keep scans rolled while calibrating: only once `states` holds every site's statistics
    # (they become the loop's carry, updated at the traced layer index).
    self.roll = roll
    self.layout_ops = layout_ops
    self.reducers = reducers
    self.states = states  # path -> name -> state, updated in place
    self.sites: dict[str, Site] = {}
    # `substitute(eqn, invals, in_src)` may return an equation's outputs computed another
    # way (e.g. a low-rank kernel as two matmuls); None binds the primitive as traced.
    self.substitute = substitute
    # Selected path -> the first primitive it entered that the replay does not follow
    # (`mul`, a nested `scan` of a layer slice, ...): why a kernel never reached a matmul.
    self.unfollowed: dict[str, str] = {}

  def record(self, src, op, x2d, contract_dims, weights=None):
    path, layer = split_source(src)
    weights = jnp.ones((x2d.shape[0],), jnp.float32) if weights is None else weights
    layers = src.layers if layer is not None else None
    x2d = x2d.astype(jnp.float32)
    site = self.sites.setdefault(path, Site(path, op, tuple(contract_dims), x2d.shape[1], layers))
    if site.layers != layers:
      raise ControlFlowError(
        f"`{path}` is used both whole and one layer at a time inside `scan`; calibration "
        "keeps one set of statistics per kernel. Use it one way, or exclude it from the rule."
      )
    if path not in self.states:
      k = x2d.shape[1]
      self.states[path] = {n: _init_state(r, k, layers) for n, r in self.reducers.items()}
    for name, reducer in self.reducers.items():
      state = self.states[path][name]
      if layer is None:
        self.states[path][name] = reducer.update(state, x2d, weights)
        continue
      new = reducer.update(jax.tree.map(lambda a: a[layer], state), x2d, weights)
      self.states[path][name] = jax.tree.map(lambda a, b: a.at[layer].set(b), state, new)

  def note(self, name, sources):
    """Remembers that each selected leaf among `sources` entered `name`, not followed."""
    for src in sources:
      path, _ = split_source(src)
      if isinstance(src, str) and path in self.selected:
        self.unfollowed.setdefault(path, name)

  def run(self, jaxpr, consts, args, origin):
    env, src = {}, {}
    for var, val in zip(jaxpr.constvars, consts, strict=True):
      env[var] = val
    for var, val, path in zip(jaxpr.invars, args, origin, strict=True):
      env[var] = val
      if path is not None:
        src[var] = path
    for eqn in jaxpr.eqns:
      invals = [_read(env, v) for v in eqn.invars]
      in_src = [src.get(v) if not isinstance(v, jcore.Literal) else None for v in eqn.invars]
      name = eqn.primitive.name
      sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      if name in _CALLS and sub is not None:
        closed = sub if isinstance(sub, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(sub, ())
        outvals, out_src = self.run(closed.jaxpr, closed.consts, invals, in_src)
      elif name in CONTROL_FLOW and any(s is not None for s in in_src):
        outvals = getattr(self, f"_{name}")(eqn, invals, in_src)
        out_src = [None] * len(outvals)
      else:
        outvals = self.substitute(eqn, invals, in_src) if self.substitute else None
        if outvals is None:
          params = eqn.primitive.get_bind_params(eqn.params)
          with eqn.ctx.manager:
            outvals = eqn.primitive.bind(*invals, **params)
          outvals = outvals if eqn.primitive.multiple_results else [outvals]
        out_src = [self._provenance(name, in_src)] * len(outvals)
        if out_src[0] is None and name not in _RECORDED:
          self.note(name, in_src)
        if name == "dot_general":
          self._on_dot(eqn, invals, in_src)
        elif name == "conv_general_dilated" and in_src[1] in self.selected:
          x2d, contract = _conv_input_matrix(invals[0], eqn.params, invals[1].shape)
          self.record(in_src[1], "conv", x2d, contract)
      for var, val, path in zip(eqn.outvars, outvals, out_src, strict=True):
        env[var] = val
        if path is not None:
          src[var] = path
    outs = [_read(env, v) for v in jaxpr.outvars]
    return outs, [src.get(v) if not isinstance(v, jcore.Literal) else None for v in jaxpr.outvars]

  def _scan(self, eqn, invals, in_src):
    """Follows a scan: layer `i` of a stacked `xs` leaf becomes `LayerSlice(path, i, length)`.

    The body is replayed once inside `lax.scan`, with `i` traced, so the compiled program
    does not grow with the number of layers; calibration's statistics ride in the carry and
    layer `i` of each is updated. Calibration's first pass (no states yet: it discovers the
    sites, abstractly) unrolls the loop instead, so each site's state exists before it rolls.
    """
    p = eqn.params
    body, length = p["jaxpr"], int(p["length"])
    nc, ncarry = p["num_consts"], p["num_carry"]
    consts, carry, xs = invals[:nc], list(invals[nc : nc + ncarry]), invals[nc + ncarry :]
    # A leaf threaded through the carry is a new value after the first step: not followed.
    self.note("scan", in_src[nc : nc + ncarry])
    xs_src = in_src[nc + ncarry :]
    nested = [s for s in xs_src if isinstance(s, LayerSlice) or isinstance(s, Derived)]
    self.note("scan", nested)  # a layer of a layer, or a transposed stack: not followed

    def layer_sources(i):
      return [
        LayerSlice(s, i, length) if isinstance(s, str) and not isinstance(s, LayerSlice) else None
        for s in xs_src
      ]

    if length and (not self.reducers or self.roll) and not self.unrolls:

      def step(carry, xs_i):
        carry, states = carry
        self.states = {p: dict(named) for p, named in states.items()}
        outs, _ = self.run(
          body.jaxpr, body.consts, [*consts, *carry, *xs_i[1:]],
          [*in_src[:nc], *([None] * ncarry), *layer_sources(xs_i[0])],
        )  # fmt: skip
        new_paths = sorted(set(self.states) - set(states))
        if self.reducers and new_paths:  # collect gives every site a state before it rolls
          raise ControlFlowError(f"Calibration met new kernels in a rolled `scan`: {new_paths}.")
        self.states = {p: named for p, named in self.states.items() if p in states}
        new = [o.astype(c.dtype) for o, c in zip(outs[:ncarry], carry, strict=True)]
        states_out = jax.tree.map(lambda n, o: n.astype(o.dtype), self.states, states)
        return (new, states_out), list(outs[ncarry:])

      index = jnp.arange(length, dtype=jnp.int32)
      (carry, self.states), ys = lax.scan(
        step, (carry, self.states), [index, *xs], length=length, reverse=p["reverse"],
        unroll=p["unroll"],
      )  # fmt: skip
      return [*carry, *ys]
    n_ys = len(eqn.outvars) - ncarry
    ys: list[list[Any]] = [[None] * length for _ in range(n_ys)]
    for step in range(length):
      i = length - 1 - step if p["reverse"] else step
      outs, _ = self.run(
        body.jaxpr, body.consts, [*consts, *carry, *[x[i] for x in xs]],
        [*in_src[:nc], *([None] * ncarry), *layer_sources(i)],
      )  # fmt: skip
      carry = list(outs[:ncarry])
      for j, y in enumerate(outs[ncarry:]):
        ys[j][i] = y
    stacked = []
    for j, var in enumerate(eqn.outvars[ncarry:]):
      aval = var.aval
      stacked.append(jnp.stack(ys[j]) if length else jnp.zeros(aval.shape, aval.dtype))
    return [*carry, *stacked]

  def _refuse(self, name, in_src):
    leaves = sorted({split_source(s)[0] for s in in_src if split_source(s)[0] in self.selected})
    if not leaves:
      return
    raise ControlFlowError(
      f"Calibration cannot accumulate statistics inside `{name}`, and "
      f"{', '.join(f'`{p}`' for p in leaves)} reaches its matmul through it: the kernel would "
      f"stay uncalibrated. Move the layer out of the `{name}` (`scan` is followed), or exclude "
      "it from the rule."
    )

  def _cond(self, eqn, invals, in_src):
    """Every branch replayed (and substituted) inside `lax.switch` on the traced index."""
    if self.substitute is None:
      self._refuse("cond", in_src)
    branches = eqn.params["branches"]

    def branch(closed):
      def body(*ops):
        return self.run(closed.jaxpr, closed.consts, list(ops), in_src[1:])[0]

      return body

    return list(lax.switch(invals[0], [branch(b) for b in branches], *invals[1:]))

  def _while(self, eqn, invals, in_src):
    """The loop replayed (and substituted) inside `lax.while_loop`; weights are its consts."""
    if self.substitute is None:
      self._refuse("while", in_src)
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cond_c, body_c, init = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
    cond_s, body_s = in_src[:cn], in_src[cn : cn + bn]
    self.note("while", in_src[cn + bn :])  # a leaf in the carry changes every iteration
    none = [None] * len(init)
    cj, bj = p["cond_jaxpr"], p["body_jaxpr"]

    def cond_fn(carry):
      return self.run(cj.jaxpr, cj.consts, [*cond_c, *carry], [*cond_s, *none])[0][0]

    def body_fn(carry):
      outs = self.run(bj.jaxpr, bj.consts, [*body_c, *carry], [*body_s, *none])[0]
      return [o.astype(c.dtype) for o, c in zip(outs, carry, strict=True)]

    return list(lax.while_loop(cond_fn, body_fn, list(init)))

  def _provenance(self, name, in_src):
    src = in_src[0] if in_src else None
    if src is None:
      return None
    if name in _TRANSPARENT:
      return src
    if name in self.layout_ops:
      return src if isinstance(src, Derived) else Derived(src, name)
    return None

  def _on_dot(self, eqn, invals, in_src):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for w_index, (w_contract, x_contract, x_batch) in ((1, (rc, lc, lb)), (0, (lc, rc, rb))):
      path = in_src[w_index]
      if path in self.selected and in_src[1 - w_index] not in self.selected:
        x = invals[1 - w_index]
        # Put the kernel's contracting dims in its own order, and the input's to match.
        order = np.argsort(w_contract)
        w_sorted = tuple(int(w_contract[i]) for i in order)
        x_sorted = tuple(int(x_contract[i]) for i in order)
        x2d = _dot_input_matrix(x, x_sorted, x_batch)
        free = tuple(x.shape[d] for d in range(x.ndim) if d not in x_contract and d not in x_batch)
        mask = None if x_batch else self.token_mask
        weights = _row_weights(mask, free, x2d.shape[0])
        self.record(path, "dot_general", x2d, w_sorted, weights)
        return


def replay_with(
  apply_fn: Callable[..., Any],
  params: Any,
  args: tuple,
  paths: Mapping[int, str],
  substitute: Substitute,
  *,
  layout_ops: frozenset[str] = frozenset(),
  unfollowed: dict[str, str] | None = None,
) -> Any:
  """Runs `apply_fn(params, *args)` with `substitute` hooked on ops fed by chosen leaves.

  Args:
    apply_fn: `(params, *args) -> outputs`; any linen/nnx/pure function.
    params: a dense param tree (jax.Array leaves).
    args: the remaining positional arguments.
    paths: `{leaf index in jax.tree.leaves(params): path}` of the leaves to follow.
    substitute: see `Substitute`; `in_src` holds each operand's leaf path, a `Derived` for
      a value one of `layout_ops` made from a followed leaf, or None.
    layout_ops: primitive names (e.g. `LAYOUT_OPS`) whose outputs are tagged `Derived`;
      by default provenance stops at them.
    unfollowed: if given, filled with `{path: primitive}`: the first op each followed leaf
      entered that the replay does not follow (its value there is no longer tracked).

  Control flow is followed (see `_Replay`): inside a `scan`, layer `i` of a stacked
  leaf reaches `substitute` as `LayerSlice(path, i, layers)` (equal to `path`) with the
  slice as its value; `cond` branches and `while` bodies are substituted too.

  Works under `jit`, `grad` and `vmap`: the replay only re-binds the traced primitives.
  """
  leaves, treedef = jax.tree.flatten(params)
  arg_leaves, arg_def = jax.tree.flatten(args)
  n = len(leaves)

  def flat_fn(*flat):
    return apply_fn(jax.tree.unflatten(treedef, flat[:n]), *jax.tree.unflatten(arg_def, flat[n:]))

  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*leaves, *arg_leaves)
  origin = [paths.get(i) for i in range(n)] + [None] * len(arg_leaves)
  replay = _Replay(set(paths.values()), {}, {}, substitute, frozenset(layout_ops))
  outs, _ = replay.run(closed.jaxpr, closed.consts, [*leaves, *arg_leaves], origin)
  if unfollowed is not None:
    unfollowed.update(replay.unfollowed)
  return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


@dataclasses.dataclass(frozen=True)
class Collected:
  """What `collect` found.

  Attributes:
    stats: `{path: {reducer name: final state}}` for every selected kernel; each state array
      of a stacked kernel (`sites[path].layers` set) has a leading layer axis.
    sites: `{path: Site}`: how each kernel is consumed.
  """

  stats: dict[str, dict[str, Any]]
  sites: dict[str, Site]


def check_finite(x: Any, index: int) -> None:
  """Raises naming batch `index` when a float leaf of `x` holds NaN or Inf."""
  for a in jax.tree.leaves(x):
    a = jnp.asarray(a)
    if jnp.issubdtype(a.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(a))):
      raise JaxshrinkError(f"Calibration batch {index} holds NaN or Inf; clean the data.")


def _leaf_param_paths(params: Any, n_leaves: int) -> list[str | None]:
  """One entry per leaf of `params`: its param path, or None for another linen collection
  (`batch_stats`, ...), which the model reads but calibration never selects."""
  paths = [path for path, _, _ in flatten_to_store(params)]
  if has_other_collections(params):
    paths = [p.removeprefix("params/") if p.startswith("params/") else None for p in paths]
  if len(paths) != n_leaves:
    raise InvalidTypeError(
      f"collect() could not give each of the {n_leaves} leaves of the param tree a path "
      f"(found {len(paths)}); pass a dict, a linen variable dict or an nnx.State."
    )
  return paths


class _Rows(_Replay):
  """Keeps every input matrix of a selected kernel, `(path, layer) -> [(x2d, weights)]`."""

  unrolls = True

  def __init__(self, selected: set[str], token_mask: jax.Array | None):
    super().__init__(selected, {}, {}, token_mask=token_mask)
    self.rows: dict[tuple[str, int | None], list[tuple[jax.Array, jax.Array]]] = {}

  def record(self, src, op, x2d, contract_dims, weights=None):
    path, layer = split_source(src)
    layers = src.layers if layer is not None else None
    self.sites.setdefault(path, Site(path, op, tuple(contract_dims), x2d.shape[1], layers))
    weights = jnp.ones((x2d.shape[0],), jnp.float32) if weights is None else weights
    self.rows.setdefault((path, layer), []).append((x2d.astype(jnp.float32), weights))


def input_rows(
  apply_fn: Callable[[Any, Any], Any], params: Any, x: Any, selected: set[str]
) -> tuple[dict[tuple[str, int | None], list[tuple[jax.Array, jax.Array]]], dict[str, Site]]:
  """Every input matrix that meets a selected kernel in `apply_fn(params, x)`, and the sites.

  For statistics that pair the inputs of two forwards row by row (sequential calibration's
  float and compressed models), which a streaming `Reducer` of one forward cannot. Meant to run
  inside `jit`, on one batch: the rows are alive until the caller reduces them. Keys are
  `(path, layer)`, `layer` None for a kernel used whole (a `scan` is unrolled); each value lists
  one `(x2d, weights)` per use, in the order of the forward. `weights` follow `padding`.
  """
  leaves, treedef = jax.tree.flatten(params)
  paths = _leaf_param_paths(params, len(leaves))
  origin = [p if p in selected else None for p in paths]
  closed = jax.make_jaxpr(lambda lv, x: apply_fn(jax.tree.unflatten(treedef, lv), x))(leaves, x)
  x_leaves = jax.tree.leaves(x)
  replay = _Rows(selected, token_mask(x, _PAD_ID.get()))
  replay.run(
    closed.jaxpr, closed.consts, [*leaves, *x_leaves], [*origin, *([None] * len(x_leaves))]
  )
  return replay.rows, replay.sites


def find_sites(
  apply_fn: Callable[..., Any],
  params: Any,
  *args: Any,
  rule: Rule | str = ".*",
  in_order: bool = False,
) -> dict[str, Site]:
  """How `apply_fn(params, *args)` consumes each kernel `rule` selects, without running it.

  The replay runs abstractly (`jax.eval_shape`); kernels that never reach a matmul or conv
  are left out. The sites tell `quantize_params(..., contract_dims=sites)` each kernel's
  input axes and, for layers stacked by `nn.scan` / `nnx.scan`, the layer axis, so every
  layer gets its own scales. `in_order=True` lists them in the order the forward first reads
  them (sequential calibration walks that order); by default they are sorted by path.

  >>> sites = find_sites(model.apply, variables, x, rule=".*kernel")
  >>> sites["ScanBlock_0/Dense_0/kernel"].layers, sites["ScanBlock_0/Dense_0/kernel"].contract_dims
  (3, (0,))
  """
  rule = as_rule(rule)
  flat = flatten(params)
  selected = {p for p, leaf in flat.items() if rule.matches(p, leaf)}
  leaves, treedef = jax.tree.flatten(params)
  paths = _leaf_param_paths(params, len(leaves))
  origin = [p if p in selected else None for p in paths]
  sites: dict[str, Site] = {}

  def run(leaves, args):
    fn = lambda lv, a: apply_fn(jax.tree.unflatten(treedef, lv), *a)  # noqa: E731
    closed = jax.make_jaxpr(fn)(leaves, args)
    arg_leaves = jax.tree.leaves(args)
    replay = _Replay(selected, {}, {})
    replay.run(
      closed.jaxpr, closed.consts, [*leaves, *arg_leaves], [*origin, *[None] * len(arg_leaves)]
    )
    sites.update(replay.sites)

  jax.eval_shape(run, leaves, args)
  return dict(sites.items() if in_order else sorted(sites.items()))


def collect(
  apply_fn: Callable[[Any, Any], Any],
  params: Any,
  batches: Iterable[Any],
  rule: Rule | str,
  reducers: Mapping[str, Reducer],
) -> Collected:
  """Streams calibration batches through `apply_fn`, reducing each kernel's inputs.

  Args:
    apply_fn: `(params, x) -> outputs`, e.g. a zoo model's `apply`.
    params: float param tree.
    batches: iterable of inputs `x` (arrays or pytrees); consumed once.
    rule: which kernels to collect for.
    reducers: statistic name -> `Reducer`.

  Returns:
    The reduced statistics and the consumption site of every selected kernel.

  Stacked layers are followed: a leaf with a leading layer axis that a `scan` consumes one
  layer at a time (`nn.scan`, `nnx.scan`) gets a `Site` with `layers=L` (contract dims of one
  layer's kernel) and statistics with a leading axis of length `L`, one entry per layer
  (`layer_stats` splits them).

  Raises:
    JaxshrinkError: no batch was given, a batch holds NaN/Inf, or a selected leaf
      never reaches a matmul or conv (e.g. an embedding table).
    ControlFlowError: a selected leaf reaches its matmul inside `cond` / `while`, or inside
      a `scan` in a way that cannot be followed; the message names the leaf and primitive.
  """
  rule = as_rule(rule)
  flat = flatten(params)
  selected = {p for p, leaf in flat.items() if rule.matches(p, leaf)}
  if not selected:
    raise JaxshrinkError(no_match_message(rule, list(flat)))
  compressed = {p for p, leaf in flat.items() if is_encoding(leaf)}
  if compressed & selected:
    named = ", ".join(f"`{p}`" for p in sorted(compressed & selected)[:4])
    raise JaxshrinkError(
      f"Calibration fits float kernels, and {named} is already compressed. Pass the kernels a "
      "method compresses again decoded (`jaxshrink.materialize`), or exclude them from the rule."
    )
  if compressed:
    # The model an earlier stage compressed runs with its decoded weights, so the statistics
    # are those of the compressed model (pruned, factorized, quantized), not of the float one.
    params = jax.tree.map(
      lambda leaf: leaf.materialize() if is_encoding(leaf) else leaf, params, is_leaf=is_encoding
    )
  leaves, treedef = jax.tree.flatten(params)
  paths = _leaf_param_paths(params, len(leaves))
  origin = [p if p in selected else None for p in paths]
  sites: dict[str, Site] = {}
  unfollowed: dict[str, str] = {}

  pad_id = _PAD_ID.get()

  def step(leaves, x, states):
    closed = jax.make_jaxpr(lambda lv, x: apply_fn(jax.tree.unflatten(treedef, lv), x))(leaves, x)
    x_leaves = jax.tree.leaves(x)
    mask = token_mask(x, pad_id)
    replay = _Replay(selected, reducers, dict(states), roll=bool(states), token_mask=mask)
    replay.run(
      closed.jaxpr, closed.consts, [*leaves, *x_leaves], [*origin, *([None] * len(x_leaves))]
    )
    sites.update(replay.sites)
    unfollowed.update(replay.unfollowed)
    return replay.states

  jitted = jax.jit(step)
  states: dict = {}
  count = 0
  for x in batches:
    check_finite(x, count)
    if count == 0:
      jax.eval_shape(lambda lv, x: step(lv, x, {}), leaves, x)  # discovers the sites
      states = {
        p: {n: _init_state(r, site.k, site.layers) for n, r in reducers.items()}
        for p, site in sites.items()
      }
    states = jitted(leaves, x, states)
    count += 1
  if count == 0:
    raise JaxshrinkError("The calibration set is empty; pass at least one batch.")
  missing = sorted(selected - set(states))
  blocked = {p: unfollowed[p] for p in missing if unfollowed.get(p) in CONTROL_FLOW}
  if blocked:
    raise ControlFlowError(
      "Calibration cannot follow these kernels to their matmul: "
      + ", ".join(f"`{p}` (through `{op}`)" for p, op in blocked.items())
      + ". A stacked leaf is followed one layer at a time through one `scan` (`nn.scan`, "
      "`nnx.scan`); a layer of an already sliced stack, or a kernel threaded through a loop's "
      "carry, is not. Feed the stack to the scan as its `xs` (or a shared kernel as a const), "
      "or exclude these leaves from the rule."
    )
  if missing:
    why = "".join(f"; `{p}` passes through `{unfollowed[p]}`" for p in missing if p in unfollowed)
    raise JaxshrinkError(
      f"Selected leaves never reach a matmul or conv: {', '.join(missing)}{why}. Exclude them "
      "from the rule (embeddings and norms have no input activations to calibrate)."
    )
  return Collected(stats={p: states[p] for p in sorted(states)}, sites=dict(sorted(sites.items())))
