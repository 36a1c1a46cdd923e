"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights for W8A8.

For a kernel `W (K, N)` fed by activations `X (rows, K)`, the per-input-channel scale
`s_k = max|X_k|^alpha / max|W_k|^(1 - alpha)` makes `X / s` easy to quantize per tensor while
`W * s` absorbs the range. `X @ W == (X / s) @ (W * s)`. `QArray.input_scale` stores `s`.

>>> s = smooth_scales(act_absmax, w2d, alpha=0.5)     # (K,) float32
"""

from __future__ import annotations

import numpy as np

from jaxshrink.errors import InvalidValueError


def smooth_scales(act_absmax: np.ndarray, w2d: np.ndarray, alpha: float) -> np.ndarray:
  """Per-input-channel migration scales `(K,)` float32, in `[1e-5, 1e5]`.

  Raises:
    ValueError: `alpha` outside [0, 1].
  """
  if not 0.0 <= float(alpha) <= 1.0:
    raise InvalidValueError(
      f"SmoothQuant `alpha` must be in [0, 1]; got {alpha!r}. 0.5 is typical."
    )
  a = np.maximum(np.asarray(act_absmax, np.float64), 1e-5)
  w = np.maximum(np.abs(np.asarray(w2d, np.float64)).max(axis=1), 1e-5)
  s = a**alpha / w ** (1.0 - alpha)
  # Dead inputs (never active) keep scale 1 rather than blowing the weight up.
  s = np.where(np.asarray(act_absmax) > 0, s, 1.0)
  return np.clip(s, 1e-5, 1e5).astype(np.float32)
