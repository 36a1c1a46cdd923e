"""Truncated-SVD factorization of Dense, DenseGeneral and conv kernels.

Each selected kernel is viewed as a `(K, N)` matrix (contracting dims first;
a conv kernel `(kh, kw, cin, cout)` becomes `(kh*kw*cin, cout)`), factored as
`U S Vᵀ`, and kept as `a = U_r √S_r`, `b = √S_r V_rᵀ` (balanced factors, so
neither needs a wider quantization range than the other). By Eckart-Young this
is the best rank-r approximation in Frobenius norm.

Given calibration inputs `X (rows, K)`, the error that matters is the layer's output
`||X W - X Ŵ||`, not the weights'. With `grams` (each kernel's `XᵀX`, from
`capture.gram_reducer`), the SVD runs on the whitened kernel `Lᵀ W`, where `L Lᵀ = XᵀX`
(Cholesky, lightly damped): `||X (W - Ŵ)|| = ||Lᵀ (W - Ŵ)||`, so truncating that SVD is the
best rank-r kernel for those inputs (SVD-LLM, Wang et al., 2024, arXiv:2403.07378), and
`a = L⁻ᵀ U_r √S_r`. The ranks still come from the weights' own spectra: a Gram dominated by
the inputs' mean makes the whitened spectra look compressible where they are not (on MiniLM's
MLP at half the params, ranks from whitened spectra: 0.801 mean cosine; from the weights'
spectra with whitened factors: 0.824). The rank is chosen per
layer by a fixed `rank`, an `energy` threshold (fraction of Σσ² kept), or a
global parameter `budget` spent greedily on the components with the most
relative energy per parameter across all layers.

>>> ctree = factorize(params, ".*dense1/kernel", rank=16)
>>> ctree["dense1"]["kernel"]
LowRank(1024x128 float32, rank 16 of 128, 18432 bytes)
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from jaxshrink.distributed import place_encoding
from jaxshrink.encoding import Encoding
from jaxshrink.errors import InvalidTypeError, InvalidValueError
from jaxshrink.lowrank.encoding import LowRank, default_contract_dims, matrix_shape
from jaxshrink.model import accepts_models
from jaxshrink.tree import Rule, as_rule, flatten, map_selected, select

# Default selection: every kernel with at least 2 dims (biases and norm scales stay dense).
KERNELS = Rule(include=".*kernel", min_ndim=2)


def _matrix(w: Any, contract_dims: tuple[int, ...]) -> np.ndarray:
  rest = tuple(d for d in range(w.ndim) if d not in contract_dims)
  k, _ = matrix_shape(tuple(w.shape), contract_dims)
  return np.transpose(np.asarray(w, np.float32), contract_dims + rest).reshape(k, -1)


def svd_factors(matrix: Any, rank: int) -> tuple[jax.Array, jax.Array]:
  """Balanced rank-`rank` factors of a `(K, N)` matrix: `a (K, r)`, `b (r, N)`, float32.

  >>> a, b = svd_factors(jnp.eye(4), 2)
  >>> a.shape, b.shape
  ((4, 2), (2, 4))
  """
  u, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
  root = np.sqrt(s[:rank])
  return jnp.asarray(u[:, :rank] * root, jnp.float32), jnp.asarray(
    root[:, None] * vt[:rank], jnp.float32
  )


# Added to the Gram's diagonal, as a fraction of its mean: keeps the Cholesky of a Gram whose
# inputs are (near) collinear or never active well defined, and caps how far the whitened
# SVD may trade unseen directions for seen ones.
WHITEN_DAMP = 0.01


def whitener(gram: Any, *, damp: float = WHITEN_DAMP, path: str = "<array>") -> np.ndarray:
  """Lower `L (K, K)` with `L Lᵀ = XᵀX + damp · mean(diag) · I`, float64.

  >>> whitener(4.0 * np.eye(2), damp=0.0)
  array([[2., 0.],
         [0., 2.]])
  """
  g = np.asarray(gram, np.float64)
  if g.ndim != 2 or g.shape[0] != g.shape[1] or not np.all(np.isfinite(g)):
    raise InvalidValueError(
      f"the Gram matrix of `{path}` must be a finite square (K, K) matrix; got shape "
      f"{g.shape}. Check the calibration data and the float model on it."
    )
  g = 0.5 * (g + g.T)
  scale = float(np.mean(np.diag(g)))
  if scale <= 0:  # no input ever reached the kernel: every direction counts the same
    return np.eye(len(g))
  for attempt in range(5):
    try:
      return np.linalg.cholesky(g + (damp * 10**attempt or 1e-6) * scale * np.eye(len(g)))
    except np.linalg.LinAlgError:
      continue
  raise InvalidValueError(
    f"the Gram matrix of `{path}` is not positive semi-definite even with damping "
    f"{damp * 1e4:g}. Check the calibration data, or factorize `{path}` without calibration."
  )


def whitened_factors(matrix: Any, lower: np.ndarray, rank: int) -> tuple[jax.Array, jax.Array]:
  """Rank-`rank` factors minimizing `||Lᵀ (W - a b)||`: the output error on the inputs
  whose Gram is `L Lᵀ`. `a (K, r)`, `b (r, N)`, float32.

  >>> a, b = whitened_factors(np.eye(3), np.eye(3), 3)
  >>> np.allclose(a @ b, np.eye(3), atol=1e-6)
  True
  """
  u, s, vt = np.linalg.svd(lower.T @ np.asarray(matrix, np.float64), full_matrices=False)
  root = np.sqrt(s[:rank])
  a = scipy.linalg.solve_triangular(lower.T, u[:, :rank] * root, lower=False)
  return jnp.asarray(a, jnp.float32), jnp.asarray(root[:, None] * vt[:rank], jnp.float32)


def singular_values(w: Any, contract_dims: tuple[int, ...] | None = None) -> np.ndarray:
  """Descending singular values of a kernel's `(K, N)` view (float64)."""
  dims = default_contract_dims(tuple(w.shape)) if contract_dims is None else contract_dims
  return np.linalg.svd(_matrix(w, dims).astype(np.float64), compute_uv=False)


def energy_rank(s: np.ndarray, energy: float) -> int:
  """Smallest r with `Σ_{i<r} σ_i² >= energy · Σ σ_i²` (at least 1).

  >>> energy_rank(np.array([3.0, 1.0, 0.0]), 0.9)
  1
  """
  check_energy(energy)
  e = np.cumsum(np.asarray(s, np.float64) ** 2)
  if e[-1] <= 0:
    return 1
  # A tiny tolerance so energy=1.0 does not ask for components that are rounding noise.
  return int(min(np.searchsorted(e / e[-1], energy - 1e-12) + 1, len(s)))


def check_energy(energy: float) -> None:
  if not isinstance(energy, (int, float)) or isinstance(energy, bool) or not 0 < energy <= 1:
    raise InvalidValueError(
      f"`energy` is the fraction of squared singular values to keep and must be in (0, 1]; got "
      f"{energy!r}. Use e.g. 0.9."
    )


def check_rank(rank: int, shape: tuple[int, ...], k: int, n: int, path: str) -> None:
  if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
    raise InvalidValueError(f"`rank` must be a positive int; got {rank!r} for `{path}`.")
  if rank > min(k, n):
    raise InvalidValueError(
      f"`rank`={rank} exceeds min(dims)={min(k, n)} of `{path}` (kernel {shape} viewed as "
      f"({k}, {n})). Use a rank <= {min(k, n)}, or exclude the layer from `target`."
    )


def allocate_budget(
  spectra: Mapping[str, np.ndarray], dims: Mapping[str, tuple[int, int]], budget: int
) -> dict[str, int]:
  """Ranks per layer whose factor params `Σ r (K + N)` stay within `budget`.

  Every layer gets rank 1, then components are added greedily by relative energy
  `σ_j² / Σσ²` per parameter `K + N` until the budget is spent, never past the rank
  `KN / (K + N)` at which a layer's factors would cost more than its dense kernel.

  Raises:
    InvalidValueError: when `budget` is below the rank-1 cost of every layer together.

  >>> allocate_budget({"w": np.array([2.0, 1.0])}, {"w": (4, 4)}, 16)
  {'w': 2}
  """
  floor = sum(k + n for k, n in dims.values())
  if budget < floor:
    raise InvalidValueError(
      f"parameter `budget`={budget} is smaller than the minimum rank-1 cost {floor} of the "
      f"{len(dims)} selected kernels (Σ (K + N)). Raise the budget or select fewer layers."
    )
  ranks = dict.fromkeys(dims, 1)
  spent = floor
  heap = []
  for path, s in spectra.items():
    total = float(np.sum(np.asarray(s, np.float64) ** 2)) or 1.0
    energies = np.asarray(s, np.float64) ** 2 / total
    k, n = dims[path]
    # Past r = KN / (K + N) the factors outgrow the dense kernel: never worth the budget.
    for j in range(1, max(1, min(k, n, (k * n) // (k + n)))):
      heap.append((-energies[j] / (k + n), path, j))
  heapq.heapify(heap)
  while heap:
    _, path, j = heapq.heappop(heap)
    cost = sum(dims[path])
    if j != ranks[path] or spent + cost > budget:
      continue  # out of order (a skipped earlier component) or does not fit: try other layers
    ranks[path] += 1
    spent += cost
  return ranks


def _resolve_contract(path: str, leaf: Any, contract_dims: Any) -> tuple[int, ...]:
  if contract_dims is None:
    return default_contract_dims(tuple(leaf.shape))
  if isinstance(contract_dims, Mapping):
    if path in contract_dims:
      return tuple(contract_dims[path])
    return default_contract_dims(tuple(leaf.shape))
  return tuple(contract_dims)


def plan_ranks(
  tree: Any,
  rule: Rule | str,
  *,
  rank: int | None = None,
  energy: float | None = None,
  budget: int | float | None = None,
  contract_dims: Any = None,
) -> dict[str, int]:
  """The rank `factorize` would give each selected kernel (see `factorize`)."""
  given = [
    name for name, v in (("rank", rank), ("energy", energy), ("budget", budget)) if v is not None
  ]
  if len(given) != 1:
    raise InvalidValueError(
      f"give exactly one of `rank`, `energy` or `budget`; got {given or 'none'}."
    )
  flat = flatten(tree)
  paths = select(tree, as_rule(rule))
  dims, spectra = {}, {}
  for path in paths:
    leaf = flat[path]
    if isinstance(leaf, Encoding):
      raise InvalidTypeError(
        f"`{path}` is already a {leaf.name} encoding; factorize float kernels before other "
        "compression, or exclude it from `target`."
      )
    if np.ndim(leaf) < 2:
      raise InvalidValueError(
        f"`{path}` has shape {tuple(leaf.shape)}; only kernels with >= 2 dims can be factored. "
        "Narrow `target` (e.g. '.*kernel') or set min_ndim=2."
      )
    cdims = _resolve_contract(path, leaf, contract_dims)
    dims[path] = matrix_shape(tuple(leaf.shape), cdims)
    if rank is not None:
      check_rank(rank, tuple(leaf.shape), *dims[path], path)
    else:
      spectra[path] = singular_values(leaf, cdims)
  if rank is not None:
    return dict.fromkeys(paths, int(rank))
  if energy is not None:
    check_energy(energy)
    return {p: energy_rank(spectra[p], energy) for p in paths}
  dense = sum(k * n for k, n in dims.values())
  if isinstance(budget, float):
    if not 0 < budget <= 1:
      raise InvalidValueError(
        f"a float `budget` is a fraction of the selected kernels' {dense} params and must be in "
        f"(0, 1]; got {budget!r}. Give an int for an absolute parameter count."
      )
    budget = int(budget * dense)
  elif not isinstance(budget, (int, np.integer)) or isinstance(budget, bool) or budget < 1:
    raise InvalidValueError(
      f"`budget` must be a positive int (params) or a fraction; got {budget!r}."
    )
  return allocate_budget(spectra, dims, int(budget))


def _checked_whitener(gram: Any, path: str, k: int) -> np.ndarray:
  if tuple(np.shape(gram)) != (k, k):
    raise InvalidValueError(
      f"the Gram matrix of `{path}` has shape {tuple(np.shape(gram))}; its kernel contracts "
      f"{k} inputs, so it must be ({k}, {k}). Collect it with `capture.gram_reducer` on this "
      "model, with the same `contract_dims`."
    )
  return whitener(gram, path=path)


def factorize_array(
  w: Any,
  rank: int,
  *,
  contract_dims: tuple[int, ...] | None = None,
  path: str = "<array>",
  gram: Any = None,
) -> LowRank:
  """One kernel as a rank-`rank` `LowRank` encoding; fitted to the inputs whose `XᵀX` is
  `gram` when one is given (see the module docstring).

  The SVD runs on the host over the whole `(K, N)` matrix: a sharded kernel is gathered
  here, the one place the maths needs every column at once. The factors then go back onto
  the kernel's mesh (`b` split like its output axis, `a` replicated).

  >>> factorize_array(jnp.ones((3, 3, 8, 16)), 4).matrix_shape
  (72, 16)
  """
  shape = tuple(w.shape)
  cdims = default_contract_dims(shape) if contract_dims is None else tuple(contract_dims)
  k, n = matrix_shape(shape, cdims)
  check_rank(rank, shape, k, n, path)
  matrix = _matrix(w, cdims)
  if gram is None:
    a, b = svd_factors(matrix, int(rank))
  else:
    a, b = whitened_factors(matrix, _checked_whitener(gram, path, k), int(rank))
  dtype = np.dtype(w.dtype).name
  encoded = LowRank.from_factors(
    a.astype(dtype), b.astype(dtype), shape=shape, contract_dims=cdims, path=path
  )
  return place_encoding(encoded, getattr(w, "sharding", None))


@accepts_models
def factorize(
  tree: Any,
  rule: Rule | str = KERNELS,
  *,
  rank: int | None = None,
  energy: float | None = None,
  budget: int | float | None = None,
  contract_dims: Any = None,
  grams: Mapping[str, Any] | None = None,
) -> Any:
  """Replaces every selected kernel with its truncated-SVD `LowRank` factors.

  Args:
    tree: float param tree (linen dict, nnx state or plain dict), or a model
      (`jaxshrink.model`): the result then comes back in its form.
    rule: which kernels; a `Rule` or an include regex.
    rank: the same rank for every kernel (<= min(K, N)).
    energy: per-kernel rank keeping this fraction of Σσ², in (0, 1].
    budget: total factor params across the selected kernels, an int, or a float in (0, 1]
      as a fraction of their dense params; allocated greedily across layers.
    contract_dims: None (every dim but the last: Dense, conv HWIO), one tuple for all, or
      `{path: dims}`; `contract_dims_from_model` reads them off the model.
    grams: optional `{path: XᵀX}` of each kernel's calibration inputs (`(K, K)`, rows in
      `capture.kernel_matrix` order); those kernels keep what matters for their outputs on
      such inputs (module docstring); ranks are chosen as without them.

  Returns:
    The tree with `LowRank` leaves.
  """
  ranks = plan_ranks(
    tree, rule, rank=rank, energy=energy, budget=budget, contract_dims=contract_dims
  )

  def encode(path: str, leaf: Any) -> Any:
    cdims = _resolve_contract(path, leaf, contract_dims)
    gram = None if grams is None else grams.get(path)
    return factorize_array(leaf, ranks[path], contract_dims=cdims, path=path, gram=gram)

  return map_selected(lambda p, leaf: encode(p, leaf) if p in ranks else leaf, tree, rule)


def contract_dims_from_model(
  apply_fn: Callable[[Any, Any], Any], params: Any, x: Any, rule: Rule | str
) -> dict[str, tuple[int, ...]]:
  """`{path: contracting dims}` of each selected kernel, read off one traced call.

  Useful for DenseGeneral kernels whose output spans several dims.
  """
  from jaxshrink.capture import Reducer, collect

  noop = Reducer(init=lambda k: jnp.zeros((), jnp.float32), update=lambda s, x2d, w: s)
  found = collect(apply_fn, params, [x], rule, {"none": noop})
  return {p: site.contract_dims for p, site in found.sites.items()}
