"""One-shot post-training pruning: magnitude (any criterion), Wanda and SparseGPT.

- `oneshot_prune`: rank once with a `Pruner` and zero the rest.
- `wanda` (in `jaxshrink.sparsity.wanda`): |w| * ||x|| per weight.
- `sparsegpt`: prune and update the remaining weights of each layer to
  reconstruct its output (Frantar & Alistarh, "SparseGPT: Massive Language
  Models Can Be Accurately Pruned in One-Shot", 2023). It uses the damped
  inverse-Hessian Cholesky factor shared with GPTQ (`jaxshrink.hessian`).

All three take unstructured sparsity or an N:M structure. Wanda and SparseGPT treat each layer
of a kernel stacked by `nn.scan` / `nnx.scan` (leading layer axis) as its own kernel: its own
input norms or Hessian, its own mask, stacked back on the layer axis.

Like every other technique they return the compressed tree only (a model for a model), its
pruned weights exactly zero; `pruned_masks(pruned, pruner)` reads the masks back off it for
`pruning(masks=...)`, `encode_sparse(masks=...)` or `shrink_params`.

>>> pruned = sparsegpt(model.apply, params, batches, Pruner(".*mlp/.*kernel", 0.5))
>>> masks = pruned_masks(pruned, Pruner(".*mlp/.*kernel", 0.5))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxshrink import capture, hessian, sequential
from jaxshrink.capture import from_matrix
from jaxshrink.errors import InvalidValueError
from jaxshrink.model import accepts_models
from jaxshrink.quant import numerics
from jaxshrink.quant.gptq import SweepPruning, check_spec, gptq_sweep
from jaxshrink.quant.qarray import QArray, normalize_contract_dims, stack
from jaxshrink.quant.spec import QuantSpec, as_layer_quant
from jaxshrink.sparsity.allocation import Pruner, apply_masks
from jaxshrink.sparsity.structures import NM, Unstructured, keep_top, nm_mask
from jaxshrink.tree import flatten, map_with_path


@accepts_models
def oneshot_prune(
  params: Any, pruner: Pruner, *, grads: Any = None, key: jax.Array | None = None
) -> Any:
  """Masks `params` once with `pruner`; returns the pruned params (pruned weights are 0).

  Args:
    params: float param tree, or a model (given back pruned, in its own form).
    pruner: what to prune and how.
    grads: gradient tree, for the `saliency` criterion.
    key: PRNG key, for the `random` criterion.

  >>> pruned = oneshot_prune(params, Pruner(".*kernel", 0.5))
  >>> masks = pruned_masks(pruned, Pruner(".*kernel", 0.5))  # bool, True = kept
  """
  return _oneshot_prune_with_masks(params, pruner, grads=grads, key=key)[0]


def _oneshot_prune_with_masks(
  params: Any, pruner: Pruner, *, grads: Any = None, key: jax.Array | None = None
) -> tuple[Any, Any]:
  """`oneshot_prune` and the masks it applied: `(pruned params, bool masks)` (the stage's)."""
  masks = pruner.masks(params, 1.0, grads=grads, key=key)
  return apply_masks(params, masks), masks


def _check_layerwise(pruner: Pruner, method: str) -> None:
  if not isinstance(pruner.structure, (Unstructured, NM)):
    raise InvalidValueError(
      f"{method} prunes single weights: structure must be 'unstructured' or 'N:M'; got "
      f"{pruner.structure.name!r}."
    )
  if pruner.allocation == "global":
    raise InvalidValueError(
      f"{method} sets each layer's sparsity on its own: use allocation 'uniform' or 'erk', "
      "not 'global'."
    )


def _layer_sparsities(pruner: Pruner, params: Any) -> tuple[list[str], dict[str, float]]:
  units, shapes = pruner.units(params)
  if isinstance(pruner.structure, NM):
    return [u.name for u in units], {u.name: pruner.structure.sparsity for u in units}
  return [u.name for u in units], pruner.unit_sparsities(units, shapes)


def _nm_on_matrix(pruner: Pruner, shape: tuple[int, ...], contract_dims: tuple[int, ...]) -> bool:
  """Whether N:M groups along the axis are runs of M consecutive rows of the matrix view.

  Rows enumerate the contracting dims row-major, so that holds for the fastest one (a Dense
  kernel's input axis, an HWIO conv's input channels).
  """
  axis = pruner.structure.axis % len(shape)
  return axis == max(contract_dims)


@functools.partial(jax.jit, static_argnames=("pruned", "n", "m", "block"))
def _sparsegpt_matrix(w, u, *, pruned: float, n: int, m: int, block: int):
  """SparseGPT on `w` `(N, K)` (rows = outputs) with upper factor `u` of H^-1.

  `n, m = 0, 0` means unstructured with fraction `pruned` per block.
  Returns the updated weights and the keep mask.
  """
  rows, k = w.shape
  keep_all = jnp.ones_like(w, dtype=bool)
  for i1 in range(0, k, block):
    i2 = min(i1 + block, k)
    count = i2 - i1
    w1, u1 = w[:, i1:i2], u[i1:i2, i1:i2]
    diag = jnp.diag(u1)
    if m == 0:
      score = (w1 / diag[None, :]) ** 2
      drop = round(pruned * score.size)
      pruned_mask = keep_top(-score, drop)  # the `drop` lowest
    else:
      pruned_mask = jnp.zeros_like(w1, dtype=bool)

    def column(i, carry, u1=u1, diag=diag):
      w1, q1, err1, pruned_mask = carry
      if m:
        start = (i // m) * m
        group = lax.dynamic_slice(w1, (0, start), (rows, m))
        gdiag = lax.dynamic_slice(diag, (start,), (m,))
        gscore = (group / gdiag[None, :]) ** 2
        gprune = ~nm_mask(gscore, n, m, axis=-1)
        updated = lax.dynamic_update_slice(pruned_mask, gprune, (0, start))
        pruned_mask = jnp.where(i % m == 0, updated, pruned_mask)
      col = w1[:, i]
      q = jnp.where(pruned_mask[:, i], 0.0, col)
      err = (col - q) / u1[i, i]
      w1 = w1 - err[:, None] * u1[i, :][None, :]
      q1 = q1.at[:, i].set(q)
      err1 = err1.at[:, i].set(err)
      return w1, q1, err1, pruned_mask

    zeros = jnp.zeros((rows, count), w.dtype)
    _, q1, err1, pruned_mask = lax.fori_loop(0, count, column, (w1, zeros, zeros, pruned_mask))
    w = w.at[:, i1:i2].set(q1)
    if i2 < k:
      w = w.at[:, i2:].add(-err1 @ u[i1:i2, i2:])
    keep_all = keep_all.at[:, i1:i2].set(~pruned_mask)
  return w, keep_all


def _check_nm_axis(pruner, w, contract_dims, path) -> None:
  nm = pruner.structure if isinstance(pruner.structure, NM) else None
  if nm is not None and not _nm_on_matrix(pruner, tuple(w.shape), contract_dims):
    raise InvalidValueError(
      f"sparsegpt applies N:M along the contracting axis; `{path}` contracts dims "
      f"{contract_dims} but the structure's axis is {nm.axis}. Use axis "
      f"{max(contract_dims) - w.ndim} or exclude the leaf."
    )


def _sparsegpt_kernel(w, h, contract_dims, pruner, sparsity, block_size, damp, path):
  """SparseGPT on one kernel (one layer of a stacked one): `(pruned kernel, keep mask)`."""
  nm = pruner.structure if isinstance(pruner.structure, NM) else None
  _check_nm_axis(pruner, w, contract_dims, path)
  u = hessian.damped_inverse_cholesky(h, damp=damp, path=path)
  matrix = capture.kernel_matrix(w.astype(jnp.float32), contract_dims).T
  dead = jnp.diag(h) == 0
  matrix = jnp.where(dead[None, :], 0.0, matrix)
  q, keep = _sparsegpt_matrix(
    matrix,
    u,
    pruned=sparsity,
    n=nm.n if nm else 0,
    m=nm.m if nm else 0,
    block=block_size,
  )
  pruned = from_matrix(q.T, w.shape, contract_dims).astype(w.dtype)
  return pruned, from_matrix(keep.T, w.shape, contract_dims)


def _joint_kernel(w, h, contract_dims, pruner, sparsity, spec, block_size, damp, path):
  """SparseGPT with quantization in the same sweep on one kernel: `(QArray, keep mask)`.

  The GPTQ row sweep (`jaxshrink.quant.gptq.gptq_sweep`) chooses the mask as SparseGPT does
  (per lazy block, or every M rows) and gives pruned weights the code of 0.0, so the error of
  pruning and of rounding both go to the rows not yet visited. Its scales are fixed first, from
  a prune-only pass: SparseGPT moves the kept weights a lot, and scales of the dense weights
  fit them badly (digits-cnn `dense1`, 50% int4 g32: 1.28x the output error of SparseGPT then
  GPTQ with those, 0.90x with these).
  """
  nm = pruner.structure if isinstance(pruner.structure, NM) else None
  _check_nm_axis(pruner, w, contract_dims, path)
  dims = normalize_contract_dims(contract_dims, w.ndim, path)
  u = hessian.damped_inverse_cholesky(h, damp=damp, path=path)
  matrix = capture.kernel_matrix(w.astype(jnp.float32), dims)
  # A dead input's weights carry nothing: zeroed, so the sweep prunes them first, at no cost.
  matrix = jnp.where((jnp.diag(h) == 0)[:, None], 0.0, matrix)
  prune = SweepPruning(sparsity, nm.n, nm.m) if nm else SweepPruning(sparsity, 0, 0)
  pruned, _ = _sparsegpt_matrix(
    matrix.T, u, pruned=sparsity, n=prune.n, m=prune.m, block=block_size
  )
  qparams = numerics.compute_qparams(pruned.T, spec, path=path)
  codes, scale, zp, keep = gptq_sweep(
    matrix, u, spec, block_size=block_size, prune=prune, qparams=qparams, path=path
  )
  q = QArray.from_codes(codes, scale, zp, spec, shape=w.shape, dtype=w.dtype, contract_dims=dims)
  return q, from_matrix(keep, w.shape, dims)


def _joint_spec(quant: Any, path: str) -> QuantSpec:
  """The weight spec `quant` stands for (a `QuantSpec` or bits), checked for `path`."""
  layer = as_layer_quant(quant)
  if layer.activation_bits is not None:
    raise InvalidValueError(
      f"sparsegpt quantizes weights only; `quant` asks for activation_bits="
      f"{layer.activation_bits} for `{path}`. Pass a QuantSpec or an int (weight bits)."
    )
  return check_spec(layer.spec, "sparsegpt", path)


@accepts_models
def sparsegpt(
  apply_fn: Callable[[Any, Any], Any],
  params: Any,
  batches: Iterable[Any],
  pruner: Pruner,
  *,
  block_size: int = 128,
  damp: float = 0.01,
  quant: QuantSpec | int | None = None,
) -> Any:
  """SparseGPT: prune each layer and re-fit its kept weights. Returns the pruned params.

  The sweep walks the input columns in order; outputs stay split like the kernel on a mesh,
  and the per-block ranking counts rather than sorts (`keep_top`), so it gathers nothing.

  With `quant` the same sweep also quantizes, as in the paper's joint mode: each kept weight
  is rounded onto the grid when its column is finalized, and the error of pruning and of
  rounding both go to the columns not yet visited (GPTQ's sweep, `jaxshrink.quant.gptq`).
  Scales are GPTQ's static groups (or per-channel scales), set before the sweep (a group's
  mask is only chosen as the sweep reaches it) from the weights a prune-only SparseGPT pass
  leaves, which the kept weights resemble far more than the dense ones. Pruned weights get
  the code of 0.0, so they decode to exactly 0 (with a zero point too: the range holds 0).

  Args:
    apply_fn: `(params, x) -> outputs`, or a model (then leave `params` out; it comes back
      pruned, in its own form).
    params: float param tree.
    batches: calibration inputs.
    pruner: rule, sparsity (uniform/erk/overrides) and structure (unstructured or N:M along
      the contracting axis, e.g. the input axis of a Dense kernel).
    block_size: columns processed per lazy-update block (a multiple of M for N:M).
    damp: Hessian damping, a fraction of its mean diagonal.
    quant: None to prune only; a `QuantSpec` (integer format) or an int `b` (`QuantSpec(
      bits=b)`) to quantize the pruned kernels in the same pass: they come back as `QArray`s.

  Raises:
    InvalidValueError: a structure other than unstructured / N:M, `global` allocation, a
      `block_size` that is not a multiple of M, or a `quant` spec that is not an integer
      format with supported bits (the message names the leaf).

  >>> pruned = sparsegpt(model.apply, params, batches, Pruner(".*kernel", structure="2:4"))
  >>> joint = sparsegpt(model.apply, params, batches, Pruner(".*kernel", 0.5),
  ...                   quant=QuantSpec(bits=4, group_size=32))
  >>> joint["dense1"]["kernel"].bits          # a QArray, pruned weights decode to 0.0
  4
  """
  return _sparsegpt_with_masks(
    apply_fn, params, batches, pruner, block_size=block_size, damp=damp, quant=quant
  )[0]


def _sparsegpt_with_masks(
  apply_fn: Callable[[Any, Any], Any],
  params: Any,
  batches: Iterable[Any],
  pruner: Pruner,
  *,
  block_size: int = 128,
  damp: float = 0.01,
  quant: QuantSpec | int | None = None,
  reference: Any = None,
) -> tuple[Any, Any]:
  """`sparsegpt` and the masks it applied: `(pruned params, bool masks)` (the stage's).

  With `quant` the pruned leaves are `QArray`s whose codes already decode to 0 off the mask.
  With `reference` (the float tree, when `params` is partly pruned already: sequential
  calibration) each kernel is moved toward the float model's outputs first (`sequential.fitted`).
  """
  _check_layerwise(pruner, "sparsegpt")
  nm = pruner.structure if isinstance(pruner.structure, NM) else None
  if nm is not None and block_size % nm.m:
    raise InvalidValueError(f"`block_size` ({block_size}) must be a multiple of M={nm.m}.")
  paths, sparsities = _layer_sparsities(pruner, params)
  # Checked before calibrating: a bad spec costs no Hessian pass.
  specs = {} if quant is None else {path: _joint_spec(quant, path) for path in paths}
  flat = flatten(params)
  if reference is None:
    hessians = hessian.collect_hessians(apply_fn, params, batches, pruner.rule)
  else:
    found = sequential.fitted(apply_fn, reference, params, batches, paths, damp=damp)
    hessians = {path: (h, site) for path, (_, h, site) in found.items()}
    flat.update({path: kernel for path, (kernel, _, _) in found.items()})
  new, masks = {}, {}
  for path in paths:
    h, site = hessians[path]
    # A stacked kernel (layers of a scan): each layer is its own kernel, with its own Hessian.
    per_layer = []
    for i, (w, h_i) in enumerate(zip(site.per_layer(flat[path]), site.per_layer(h), strict=True)):
      name = path if site.layers is None else f"{path}[{i}]"
      args = (w, h_i, site.contract_dims, pruner, float(sparsities[path]))
      if quant is None:
        per_layer.append(_sparsegpt_kernel(*args, block_size, damp, name))
      else:
        per_layer.append(_joint_kernel(*args, specs[path], block_size, damp, name))
    kernels = [q for q, _ in per_layer]
    if site.layers is None:
      new[path] = kernels[0]
    else:
      new[path] = jnp.stack(kernels) if quant is None else stack(kernels)
    masks[path] = per_layer[0][1] if site.layers is None else jnp.stack([k for _, k in per_layer])
  pruned = map_with_path(lambda p, leaf: new.get(p, leaf), params)
  tree = map_with_path(lambda p, leaf: masks.get(p, jnp.ones((), bool)), params)
  if quant is not None:  # the codes hold the zeros already
    return pruned, tree
  return apply_masks(pruned, tree), tree
