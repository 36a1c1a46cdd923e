"""Quantized dot_general on sharded inputs, against the single-device result.

Run as a script (tests/test_quant_sharding.py does, in a subprocess): it forces 8 simulated
CPU devices and prints one JSON object `{case: {"max_err", "out_sharding_ok", "collectives"}}`:

- `max_err`: largest absolute difference between the jitted sharded result (forward, and the
  gradients for the QAT modes) and the same function on one device;
- `out_sharding_ok`: the output keeps the rows' and columns' shardings (`P(data, model)`);
- `collectives`: collective ops in the compiled forward program.

Cases: `QuantDotGeneral` in `fake`, `int` and `int_full` modes and `qarray_matmul` on a
grouped asymmetric int8 `QArray` (integer serving path), each on a data-parallel mesh `(8,)`
(activations split by rows, weights replicated), a model-parallel mesh `(2, 4)` (rows on
`data`, output columns on `model`), and `(2, 4)` with the contraction split on `model`.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxshrink.quant import QuantDotGeneral, QuantSpec, quantize  # noqa: E402
from jaxshrink.quant.serve import qarray_matmul  # noqa: E402

DIMS = (((1,), (0,)), ((), ()))
X = jax.random.normal(jax.random.key(0), (16, 64))
W = jax.random.normal(jax.random.key(1), (64, 32)) + 0.2
# mesh shape, axis names, activation spec, weight spec, expected output spec
LAYOUTS = {
  "dp8": ((8,), ("data",), P("data", None), P(None, None), P("data", None)),
  "mp2x4": ((2, 4), ("data", "model"), P("data", None), P(None, "model"), P("data", "model")),
  "mp2x4-contract": ((2, 4), ("data", "model"), P("data", "model"), P("model", None), None),
}
_COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)")


def _mode_fns(mode):
  dot = QuantDotGeneral(mode=mode)
  forward = lambda x, w: dot(x, w, DIMS)  # noqa: E731
  loss = lambda x, w: jnp.sum(jnp.sin(dot(x, w, DIMS)))  # noqa: E731
  return forward, jax.grad(loss, argnums=(0, 1))


def _max_err(a, b) -> float:
  return max(
    float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def _check(forward, grad, args, sharded_args, mesh, out_spec) -> dict:
  single = jax.jit(forward)(*args)
  out = jax.jit(forward)(*sharded_args)
  err = _max_err(single, out)
  if grad is not None:
    err = max(err, _max_err(jax.jit(grad)(*args), jax.jit(grad)(*sharded_args)))
  hlo = jax.jit(forward).lower(*sharded_args).compile().as_text()
  ok = out_spec is None or out.sharding.is_equivalent_to(NamedSharding(mesh, out_spec), out.ndim)
  return {
    "max_err": err,
    "out_sharding_ok": bool(ok),
    "out_sharding": str(out.sharding.spec if hasattr(out.sharding, "spec") else out.sharding),
    "collectives": sorted(set(_COLLECTIVE.findall(hlo))),
  }


def main() -> dict:
  assert len(jax.devices()) == 8, jax.devices()
  results = {}
  q = quantize(W, QuantSpec(bits=8, group_size=16, symmetric=False))
  q = dataclasses.replace(q, act_bits=8)
  for layout, (shape, names, x_spec, w_spec, out_spec) in LAYOUTS.items():
    mesh = Mesh(np.asarray(jax.devices()).reshape(shape), names)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731, B023
    xs, ws = put(X, x_spec), put(W, w_spec)
    for mode in ("fake", "int", "int_full"):
      forward, grad = _mode_fns(mode)
      results[f"{mode}/{layout}"] = _check(forward, grad, (X, W), (xs, ws), mesh, out_spec)
    # Serving: codes, scales and zero points split like the weight's output columns.
    column = P(None, w_spec[1]) if layout != "mp2x4-contract" else P(None, None)
    qs = dataclasses.replace(
      q, codes=put(q.codes, column), scale=put(q.scale, column),
      zero_point=put(q.zero_point, column),
    )  # fmt: skip
    results[f"serve/{layout}"] = _check(qarray_matmul, None, (X, q), (xs, qs), mesh, out_spec)
  return results


if __name__ == "__main__":
  print(json.dumps(main()))
