"""Quantizing the factors of a low-rank kernel, so factorize then quantize stacks both savings.

A factorized kernel `W = a @ b` (`a (K, r)`, `b (r, N)`, `lowrank.LowRank`) is served as
`(x @ a) @ b`. Each factor is quantized as a kernel of its own, contracting over its first
axis: `a` gets one scale per rank component (or per group of K inputs), `b` one per output
channel (or per group of r). With GPTQ each factor gets the Hessian of its own input:
`a` meets `x`, so `H_a = H` (the Hessian calibration collected for the whole kernel); `b`
meets `x @ â`, with `â` the quantized `a`, so `H_b = âᵀ H â`. Both come from one collection
and `b` compensates `a`'s rounding, as GPTQ's later columns compensate earlier ones.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxshrink.encoding import Encoding, materialize
from jaxshrink.errors import InvalidTypeError
from jaxshrink.lowrank.encoding import LowRank
from jaxshrink.quant.gptq import gptq_kernel
from jaxshrink.quant.qarray import quantize
from jaxshrink.quant.spec import QuantSpec


def _check_float_factors(path: str, leaf: LowRank) -> None:
  if isinstance(leaf.a, Encoding) or isinstance(leaf.b, Encoding):
    raise InvalidTypeError(
      f"The factors of `{path}` are already encoded ({leaf.describe()}); quantize them once."
    )


def rtn_factors(path: str, leaf: LowRank, spec: QuantSpec) -> LowRank:
  """Both factors round-to-nearest with `spec` (one scale per column or per group of rows)."""
  _check_float_factors(path, leaf)
  a, b = leaf.factors()
  qa = quantize(a, spec, contract_dims=(0,), path=f"{path}/a")
  qb = quantize(b, spec, contract_dims=(0,), path=f"{path}/b")
  return LowRank(a=qa, b=qb, shape=leaf.shape, dtype=leaf.dtype, contract_dims=leaf.contract_dims)


def gptq_factors(
  path: str,
  leaf: LowRank,
  h: Any,
  spec: QuantSpec,
  *,
  damp: float = 0.01,
  act_order: bool = False,
) -> LowRank:
  """Both factors by GPTQ: `a` with the kernel's input Hessian `h` `(K, K)`, then `b` with
  `âᵀ h â`, the Hessian of the rank activations the quantized `a` produces."""
  _check_float_factors(path, leaf)
  a, b = leaf.factors()
  h = jnp.asarray(h, jnp.float32)
  qa = gptq_kernel(
    a, h, spec, contract_dims=(0,), damp=damp, act_order=act_order,
    path=f"{path}/a",
  )  # fmt: skip
  a_hat = materialize(qa).astype(jnp.float32)
  h_b = a_hat.T @ h @ a_hat
  qb = gptq_kernel(
    b, h_b, spec, contract_dims=(0,), damp=damp, act_order=act_order,
    path=f"{path}/b",
  )  # fmt: skip
  return LowRank(a=qa, b=qb, shape=leaf.shape, dtype=leaf.dtype, contract_dims=leaf.contract_dims)
