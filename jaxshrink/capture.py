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

>>> stats = collect(model.apply, params, batches, ".*kernel", {"absmax": absmax_reducer()})
>>> stats["Dense_0/kernel"]["absmax"].shape      # (in_features,)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jaxshrink.encoding import is_encoding
from jaxshrink.errors import JaxshrinkError
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
# Control flow the replay runs as a whole: a kernel used inside is never seen by a matmul.
CONTROL_FLOW = frozenset({"scan", "while", "cond"})


@dataclasses.dataclass(frozen=True)
class Reducer:
  """A streaming statistic of the `(rows, K)` input matrix of a kernel.

  Attributes:
    init: `K -> state` (a pytree of arrays).
    update: `(state, x2d) -> state`; traced inside `jit`.
  """

  init: Callable[[int], Any]
  update: Callable[[Any, jax.Array], Any]


def absmax_reducer() -> Reducer:
  """Per input channel max |x|, shape `(K,)`."""
  return Reducer(
    init=lambda k: jnp.zeros((k,), jnp.float32),
    update=lambda s, x: jnp.maximum(s, jnp.max(jnp.abs(x), axis=0)),
  )


def minmax_reducer() -> Reducer:
  """Per input channel `(min, max)`, each shape `(K,)`."""
  return Reducer(
    init=lambda k: (jnp.full((k,), jnp.inf, jnp.float32), jnp.full((k,), -jnp.inf, jnp.float32)),
    update=lambda s, x: (jnp.minimum(s[0], x.min(axis=0)), jnp.maximum(s[1], x.max(axis=0))),
  )


def sum_squares_reducer() -> Reducer:
  """Per input channel sum of x² and the row count; `sqrt(sum)` is Wanda's ‖x‖."""
  return Reducer(
    init=lambda k: (jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.float32)),
    update=lambda s, x: (s[0] + jnp.sum(x * x, axis=0), s[1] + x.shape[0]),
  )


def gram_reducer() -> Reducer:
  """`X^T X` summed over rows, shape `(K, K)` in float32, and the row count."""
  return Reducer(
    init=lambda k: (jnp.zeros((k, k), jnp.float32), jnp.zeros((), jnp.float32)),
    update=lambda s, x: (s[0] + x.T @ x, s[1] + x.shape[0]),
  )


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
    contract_dims: the kernel's contracting dimensions (leading, in order).
    k: number of contracting elements (the width of `x2d`).
  """

  path: str
  op: str
  contract_dims: tuple[int, ...]
  k: int


def kernel_matrix(kernel: jax.Array, contract_dims: tuple[int, ...]) -> jax.Array:
  """Views a kernel as `(K, N)`: contracting dims first, the rest flattened."""
  rest = tuple(d for d in range(kernel.ndim) if d not in contract_dims)
  k = int(np.prod([kernel.shape[d] for d in contract_dims]))
  return jnp.transpose(kernel, contract_dims + rest).reshape(k, -1)


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
  """Evaluates a jaxpr, following param provenance and feeding reducers."""

  def __init__(
    self,
    selected: set[str],
    reducers: Mapping[str, Reducer],
    states: dict,
    substitute: Callable[[Any, list, list], list | None] | None = None,
    layout_ops: frozenset[str] = frozenset(),
  ):
    self.selected = selected
    self.layout_ops = layout_ops
    self.reducers = reducers
    self.states = states  # path -> name -> state, updated in place
    self.sites: dict[str, Site] = {}
    # `substitute(eqn, invals, in_src)` may return an equation's outputs computed another
    # way (e.g. a low-rank kernel as two matmuls); None binds the primitive as traced.
    self.substitute = substitute
    # Selected path -> the first primitive it entered that the replay does not follow
    # (`scan`, `while`, `cond`, `mul`, ...): why a kernel never reached a recorded matmul.
    self.unfollowed: dict[str, str] = {}

  def record(self, path, op, x2d, contract_dims):
    x2d = x2d.astype(jnp.float32)
    self.sites.setdefault(path, Site(path, op, tuple(contract_dims), x2d.shape[1]))
    if path not in self.states:
      self.states[path] = {n: r.init(x2d.shape[1]) for n, r in self.reducers.items()}
    for name, reducer in self.reducers.items():
      self.states[path][name] = reducer.update(self.states[path][name], x2d)

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
      else:
        outvals = self.substitute(eqn, invals, in_src) if self.substitute else None
        if outvals is None:
          params = eqn.primitive.get_bind_params(eqn.params)
          with eqn.ctx.manager:
            outvals = eqn.primitive.bind(*invals, **params)
          outvals = outvals if eqn.primitive.multiple_results else [outvals]
        out_src = [self._provenance(name, in_src)] * len(outvals)
        if out_src[0] is None and name not in _RECORDED:
          for path in in_src:
            if isinstance(path, str) and path in self.selected:
              self.unfollowed.setdefault(path, name)
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
        self.record(path, "dot_general", _dot_input_matrix(x, x_sorted, x_batch), w_sorted)
        return


def replay_with(
  apply_fn: Callable[..., Any],
  params: Any,
  args: tuple,
  paths: Mapping[int, str],
  substitute: Substitute,
  *,
  layout_ops: frozenset[str] = frozenset(),
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
  return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


@dataclasses.dataclass(frozen=True)
class Collected:
  """What `collect` found.

  Attributes:
    stats: `{path: {reducer name: final state}}` for every selected kernel.
    sites: `{path: Site}`: how each kernel is consumed.
  """

  stats: dict[str, dict[str, Any]]
  sites: dict[str, Site]


def _check_finite(x: Any, index: int) -> None:
  for a in jax.tree.leaves(x):
    a = jnp.asarray(a)
    if jnp.issubdtype(a.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(a))):
      raise JaxshrinkError(f"Calibration batch {index} holds NaN or Inf; clean the data.")


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

  Raises:
    JaxshrinkError: no batch was given, a batch holds NaN/Inf, or a selected leaf
      never reaches a matmul or conv (e.g. an embedding table).
  """
  rule = as_rule(rule)
  flat = flatten(params)
  selected = {p for p, leaf in flat.items() if rule.matches(p, leaf)}
  if not selected:
    raise JaxshrinkError(no_match_message(rule, list(flat)))
  leaves, treedef = jax.tree.flatten(params)
  compressed = [p for p, leaf in flat.items() if is_encoding(leaf)]
  if compressed:
    raise JaxshrinkError(
      f"Calibration runs on float params, and {', '.join(compressed[:4])}"
      f"{' ...' if len(compressed) > 4 else ''} is already compressed. Run the calibrated "
      "method (gptq, awq, smoothquant, W8A8 ptq, wanda, sparsegpt) before the stage that "
      "compressed it, or on `jaxshrink.materialize(tree)`."
    )
  # One entry per leaf of `params`: its param path, or None for another linen collection
  # (`batch_stats`, ...), which the model reads but calibration never selects.
  paths = [path for path, _, _ in flatten_to_store(params)]
  if has_other_collections(params):
    paths = [p.removeprefix("params/") if p.startswith("params/") else None for p in paths]
  if len(paths) != len(leaves):
    raise TypeError(
      f"collect() could not give each of the {len(leaves)} leaves of the param tree a path "
      f"(found {len(paths)}); pass a dict, a linen variable dict or an nnx.State."
    )
  origin = [p if p in selected else None for p in paths]
  sites: dict[str, Site] = {}
  unfollowed: dict[str, str] = {}

  def step(leaves, x, states):
    closed = jax.make_jaxpr(lambda lv, x: apply_fn(jax.tree.unflatten(treedef, lv), x))(leaves, x)
    x_leaves = jax.tree.leaves(x)
    replay = _Replay(selected, reducers, dict(states))
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
    _check_finite(x, count)
    if count == 0:
      jax.eval_shape(lambda lv, x: step(lv, x, {}), leaves, x)  # discovers the sites
      states = {p: {n: r.init(sites[p].k) for n, r in reducers.items()} for p in sites}
    states = jitted(leaves, x, states)
    count += 1
  if count == 0:
    raise JaxshrinkError("The calibration set is empty; pass at least one batch.")
  missing = sorted(selected - set(states))
  blocked = {p: unfollowed[p] for p in missing if unfollowed.get(p) in CONTROL_FLOW}
  if blocked:
    raise JaxshrinkError(
      "Calibration does not follow control flow, and these kernels reach their matmul "
      "inside it: "
      + ", ".join(f"`{p}` (through `{op}`)" for p, op in blocked.items())
      + ". Layers stacked by `nn.scan`/`nnx.scan` (or run in a while/cond) must be unrolled "
      "for calibration (e.g. a Python loop over layers), or excluded from the rule."
    )
  if missing:
    why = "".join(f"; `{p}` passes through `{unfollowed[p]}`" for p in missing if p in unfollowed)
    raise JaxshrinkError(
      f"Selected leaves never reach a matmul or conv: {', '.join(missing)}{why}. Exclude them "
      "from the rule (embeddings and norms have no input activations to calibrate)."
    )
  return Collected(stats={p: states[p] for p in sorted(states)}, sites=dict(sorted(sites.items())))
