"""Interop with AQT (`aqtp`): equivalent configs, and AQT as the QAT backend.

jaxshrink's `QuantDotGeneral(mode="int", preserve_max_val=False)` computes the same int8
forward as `aqt_flax.AqtDotGeneral(fully_quantized(fwd_bits=8, bwd_bits=None,
use_stochastic_rounding=False))` (per-token lhs and per-channel rhs absmax scales at
`qmax + 0.5`, round to nearest, int32 accumulation); `tests/test_quant_dot.py` checks it.
With the default `preserve_max_val=True` the two differ by at most one code step per operand.

>>> module = model.module.clone(dot_general=aqt_dot_general(fwd_bits=8))   # AQT backend
>>> ours = jaxshrink_equivalent(fwd_bits=8)                                 # our backend
"""

from __future__ import annotations

from typing import Any

from jaxshrink.errors import InvalidValueError
from jaxshrink.quant.dot_general import QuantDotGeneral


def aqt_config(fwd_bits: int = 8, bwd_bits: int | None = None) -> Any:
  """AQT `DotGeneral` config: int8 forward, and int8 backward too when `bwd_bits=8`."""
  from aqt.jax.v2 import config as aqt_config_lib

  return aqt_config_lib.fully_quantized(
    fwd_bits=fwd_bits, bwd_bits=bwd_bits, use_stochastic_rounding=False
  )


def aqt_dot_general(fwd_bits: int = 8, bwd_bits: int | None = None) -> Any:
  """An `AqtDotGeneral` module for a linen layer's `dot_general=` (AQT as the QAT backend).

  Flax adopts it as a submodule; AQT's QAT mode keeps float params, so training stays yours.
  """
  from aqt.jax.v2.flax import aqt_flax

  return aqt_flax.AqtDotGeneral(aqt_config(fwd_bits, bwd_bits))


def jaxshrink_equivalent(fwd_bits: int = 8, bwd_bits: int | None = None) -> QuantDotGeneral:
  """Our `QuantDotGeneral` with AQT's numerics for the same config."""
  return QuantDotGeneral(
    mode="int_full" if bwd_bits else "int",
    weight_bits=fwd_bits,
    activation_bits=fwd_bits,
    preserve_max_val=False,
  )


def qat_dot_general(backend: str = "jaxshrink", *, fwd_bits: int = 8,
                    bwd_bits: int | None = None) -> Any:  # fmt: skip
  """The int8 QAT `dot_general` for `backend` `jaxshrink` or `aqt`."""
  if backend == "aqt":
    return aqt_dot_general(fwd_bits, bwd_bits)
  if backend == "jaxshrink":
    return QuantDotGeneral(
      mode="int_full" if bwd_bits else "int", weight_bits=fwd_bits, activation_bits=fwd_bits
    )
  raise InvalidValueError(f"QAT `backend` must be `jaxshrink` or `aqt`; got {backend!r}.")
