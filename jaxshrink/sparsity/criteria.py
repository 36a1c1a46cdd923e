"""Pruning criteria: one importance score per weight, higher means keep.

- `magnitude`: |w|.
- `random`: uniform noise from a key (the usual sanity baseline).
- `saliency`: |w * g|, first-order Taylor estimate of the loss change
  (Molchanov et al., 2017).
- `wanda`: |w| * ||x||, the weight times the L2 norm of its input feature over
  calibration data (Sun et al., "A Simple and Effective Pruning Approach for
  Large Language Models", 2023).

>>> score_leaf("magnitude", jnp.array([[-3.0, 1.0]])).tolist()
[[3.0, 1.0]]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.capture import from_matrix
from jaxshrink.errors import InvalidTypeError, InvalidValueError

CRITERIA = ("magnitude", "random", "saliency", "wanda")


def check_criterion(criterion: Any) -> str:
  if not isinstance(criterion, str):
    raise InvalidTypeError(f"`criterion` must be a string; got {type(criterion).__name__}.")
  if criterion not in CRITERIA:
    raise InvalidValueError(f"Unknown criterion {criterion!r}; expected one of {list(CRITERIA)}.")
  return criterion


def wanda_scores(
  w: jax.Array, input_norm: jax.Array, contract_dims: tuple[int, ...] = (0,), *, path: str = ""
) -> jax.Array:
  """|w| scaled by the L2 norm of the input feature each weight multiplies.

  Args:
    w: kernel of any rank.
    input_norm: `(K,)` norms, `K` the product of `w`'s contracting dims in kernel
      order (as `capture.collect` reports them).
    contract_dims: the kernel's contracting dims (`(0,)` for Dense, `(0, 1, 2)` for HWIO convs).
    path: leaf path for error messages.

  Returns:
    float32 scores shaped like `w`.
  """
  k = int(np.prod([w.shape[d] for d in contract_dims]))
  if input_norm.shape != (k,):
    raise InvalidValueError(
      f"wanda needs one input norm per contracting element of `{path}`: expected shape ({k},), "
      f"got {input_norm.shape}. Collect the norms with capture.collect for this kernel."
    )
  rest = tuple(d for d in range(w.ndim) if d not in contract_dims)
  matrix = jnp.transpose(jnp.abs(w).astype(jnp.float32), contract_dims + rest).reshape(k, -1)
  return from_matrix(matrix * input_norm[:, None].astype(jnp.float32), w.shape, contract_dims)


def score_leaf(
  criterion: str,
  w: jax.Array,
  *,
  grad: jax.Array | None = None,
  input_norm: jax.Array | None = None,
  contract_dims: tuple[int, ...] = (0,),
  key: jax.Array | None = None,
  path: str = "<array>",
) -> jax.Array:
  """Importance of every weight of one leaf under `criterion`, float32, shaped like `w`.

  Raises:
    ValueError: unknown criterion, or the data it needs (grad, key, input norm) is missing.
  """
  check_criterion(criterion)
  if criterion == "magnitude":
    return jnp.abs(w).astype(jnp.float32)
  if criterion == "random":
    if key is None:
      raise InvalidValueError(
        f"criterion 'random' needs a PRNG `key` to score `{path}`; pass key=..."
      )
    return jax.random.uniform(key, w.shape, jnp.float32)
  if criterion == "saliency":
    if grad is None:
      raise InvalidValueError(
        f"criterion 'saliency' needs the gradient of `{path}`; pass grads=... (the pruning "
        "wrapper passes them automatically)."
      )
    return jnp.abs(w.astype(jnp.float32) * grad.astype(jnp.float32))
  if input_norm is None:
    raise InvalidValueError(
      f"criterion 'wanda' needs calibration input norms for `{path}`; use "
      "jaxshrink.sparsity.wanda(apply_fn, params, batches, ...) which collects them."
    )
  return wanda_scores(w, input_norm, contract_dims, path=path)
