"""Layer Hessians from calibration activations, shared by GPTQ and SparseGPT.

For a kernel `W` of shape `(K, N)` fed by inputs `X` of shape `(rows, K)`, the
layer-wise reconstruction loss `||X W - X Ŵ||²` has Hessian `H = 2/rows · XᵀX`
with respect to each output column of `W`. GPTQ (Frantar et al., 2022,
arXiv:2210.17323) and SparseGPT (Frantar & Alistarh, 2023, arXiv:2301.00774)
both walk the rows of `W` in order and need the upper Cholesky factor of the
damped inverse `(H + λI)⁻¹`; this module builds it once, robustly, for both.

Only `XᵀX` is kept per layer (`K × K` float32), streamed over calibration
batches by `jaxshrink.capture`, so memory does not grow with the calibration set.

>>> hessians = collect_hessians(model.apply, params, batches, ".*kernel")
>>> h, site = hessians["Dense_0/kernel"]          # h: (K, K) float32
>>> u = damped_inverse_cholesky(h, path="Dense_0/kernel")   # (K, K) upper triangular
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink import capture
from jaxshrink.errors import InvalidValueError, JaxshrinkError
from jaxshrink.tree import Rule, select

# Damping a retry falls back to when the caller asked for none (10x of it can never help).
_RETRY_DAMP = 0.01


def hessian_from_gram(gram: jax.Array, count: Any) -> jax.Array:
  """`2/count · XᵀX`: the layer Hessian from `capture.gram_reducer`'s state.

  Args:
    gram: `(K, K)` sum of `xᵀx` over the calibration rows.
    count: number of rows summed (scalar).

  Returns:
    `(K, K)` float32 Hessian.

  >>> x = jnp.ones((4, 3))
  >>> hessian_from_gram(x.T @ x, 4)[0, 0]
  Array(2., dtype=float32)
  """
  gram = jnp.asarray(gram, jnp.float32)
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
    raise InvalidValueError(f"`gram` must be a square (K, K) matrix; got shape {gram.shape}.")
  if not isinstance(count, jax.core.Tracer) and float(count) <= 0:
    raise JaxshrinkError(
      f"`count` must be the positive number of calibration rows; got {float(count)}. "
      "Pass at least one calibration batch."
    )
  return (2.0 / jnp.asarray(count, jnp.float32)) * gram


def damped(h: jax.Array, damp: jax.Array) -> jax.Array:
  """`H + damp · mean(diag H) · I`, a dead input's row and column pinned to the identity first.

  A dead input (never nonzero in calibration) has a zero row and column; pinned to 1 the matrix
  stays invertible, and its weights can take any value without changing the output. Traceable
  (GPTQ's and SparseGPT's factor, sequential calibration's solve).
  """
  dead = jnp.diag(h) == 0
  h = jnp.where(dead[:, None] | dead[None, :], 0.0, h) + jnp.diag(dead.astype(h.dtype))
  return h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype)


@jax.jit
def _inverse_cholesky(h: jax.Array, damp: jax.Array) -> jax.Array:
  """Upper `U` with `UᵀU = (H + damp · mean(diag H) · I)⁻¹`; NaN when not positive definite."""
  eye = jnp.eye(h.shape[0], dtype=jnp.float32)
  lower = jnp.linalg.cholesky(damped(h, damp))
  inverse = jax.scipy.linalg.cho_solve((lower, True), eye)
  # Symmetrize: cho_solve leaves rounding asymmetry the second Cholesky would amplify.
  inverse = 0.5 * (inverse + inverse.T)
  return jnp.linalg.cholesky(inverse).T


def damped_inverse_cholesky(
  h: jax.Array, *, damp: float = 0.01, path: str = "<array>", max_tries: int = 5
) -> jax.Array:
  """Upper Cholesky factor of the damped inverse Hessian, as GPTQ and SparseGPT use it.

  Adds `damp · mean(diag H)` to the diagonal (inputs whose diagonal is zero get
  1 first), inverts, and factors the inverse as `UᵀU`. When a factorization
  fails (NaN from an indefinite or ill-conditioned matrix) it retries with 10x
  the damping, warning with the layer path, up to `max_tries` attempts.

  Args:
    h: `(K, K)` Hessian, e.g. from `hessian_from_gram`.
    damp: relative damping λ, a fraction of the mean diagonal.
    path: leaf path named in warnings and errors.
    max_tries: attempts in total, each with 10x the previous damping.

  Returns:
    `(K, K)` float32 upper triangular `U`.

  Raises:
    JaxshrinkError: `h` holds NaN/Inf, or every attempt failed.

  >>> damped_inverse_cholesky(2.0 * jnp.eye(3), damp=0.0)
  Array([[0.70710677, 0.        , 0.        ], ...
  """
  h = jnp.asarray(h, jnp.float32)
  if h.ndim != 2 or h.shape[0] != h.shape[1]:
    raise InvalidValueError(
      f"The Hessian of `{path}` must be a square (K, K) matrix; got {h.shape}."
    )
  if not isinstance(damp, (int, float)) or not np.isfinite(damp) or damp < 0:
    raise InvalidValueError(f"`damp` must be a finite float >= 0; got {damp!r}. 0.01 is typical.")
  if not isinstance(max_tries, int) or max_tries < 1:
    raise InvalidValueError(f"`max_tries` must be an int >= 1; got {max_tries!r}.")
  if not bool(jnp.all(jnp.isfinite(h))):
    raise JaxshrinkError(
      f"The Hessian of `{path}` holds NaN or Inf: its calibration activations overflowed. "
      "Check the calibration data and the float model on it, or exclude the layer from the rule."
    )
  tried = []
  for attempt in range(max_tries):
    if attempt == 0:
      current = float(damp)
    else:
      current = tried[-1] * 10.0 if tried[-1] > 0 else _RETRY_DAMP
    tried.append(current)
    upper = _inverse_cholesky(h, jnp.float32(current))
    if bool(jnp.all(jnp.isfinite(upper))):
      if attempt:
        warnings.warn(
          f"Cholesky of the Hessian of `{path}` failed with damp={tried[0]:g}; succeeded with "
          f"damp={current:g}.",
          stacklevel=2,
        )
      return upper
  raise JaxshrinkError(
    f"Cholesky of the damped Hessian of `{path}` failed {max_tries} times (damp "
    f"{', '.join(f'{d:g}' for d in tried)}): the Hessian is not positive semi-definite. Pass a "
    "larger `damp` (e.g. 0.1), use more calibration data, or exclude the layer from the rule."
  )


def collect_hessians(
  apply_fn: Callable[[Any, Any], Any],
  params: Any,
  batches: Iterable[Any],
  rule: Rule | str,
) -> dict[str, tuple[jax.Array, capture.Site]]:
  """Streams calibration batches and returns each selected kernel's Hessian.

  Args:
    apply_fn: `(params, x) -> outputs`.
    params: float param tree.
    batches: iterable of model inputs, consumed once.
    rule: which kernels.

  Returns:
    `{path: (H, site)}`: `H` is `(K, K)` float32 in the order of
    `capture.kernel_matrix(kernel, site.contract_dims)`'s rows; for a stacked kernel
    (`site.layers = L`, layers of a `scan`) it is `(L, K, K)`, one Hessian per layer.

  Raises:
    JaxshrinkError: empty calibration set, NaN/Inf in a batch, a rule that
      selects nothing, or a selected leaf that never meets a matmul.

  >>> h, site = collect_hessians(model.apply, params, [x], "Dense_0/kernel")["Dense_0/kernel"]
  """
  select(params, rule)  # a rule that matches nothing raises NoMatchError listing the paths
  collected = capture.collect(apply_fn, params, batches, rule, {"gram": capture.gram_reducer()})
  out = {}
  for path, stats in collected.stats.items():
    site = collected.sites[path]
    per_layer = [hessian_from_gram(*gram) for gram in capture.layer_stats(stats["gram"], site)]
    out[path] = (per_layer[0] if site.layers is None else jnp.stack(per_layer), site)
  return out
