"""Every compression transform on sharded params, against the single-device result.

Run as a script (tests/test_sharded.py does, in a subprocess): it forces 8 simulated CPU
devices, runs each check on a data-parallel mesh `(8,)` and a model-parallel mesh `(2, 4)`
(`quantize_params` of QAT-trained params, recorded as `convert`, and the QAT dot also on
`(4, 2)`), and prints one JSON object
`{check: {"equal", "err", "layout", "gathers"}}`:

- `equal`: the sharded result equals the single-device one (exact for masks and codes,
  float tolerance for trained params);
- `layout`: outputs are sharded like their weight (codes, masks, params) and scales along
  the kept output axis; a list of mismatches, empty when fine;
- `gathers`: all-gathers in the compiled program whose result is as large as a whole sharded
  parameter (empty when nothing is gathered).

Params are digits-cnn's (random init): kernels (3,3,1,32), (3,3,32,64), (1024,128), (128,10).
Model-parallel meshes shard every kernel and bias on its output axis when it divides.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxshrink import distributed, hessian  # noqa: E402
from jaxshrink.distill import DistillLoss, distill_step  # noqa: E402
from jaxshrink.lowrank.svd import factorize_array  # noqa: E402
from jaxshrink.models import cross_entropy_loss, get_model  # noqa: E402
from jaxshrink.quant import QuantDotGeneral, QuantSpec, quantize, quantize_params  # noqa: E402
from jaxshrink.quant.gptq import gptq_kernel  # noqa: E402
from jaxshrink.sparsity import Pruner, one_shot_schedule, pruning  # noqa: E402
from jaxshrink.sparsity.oneshot import _sparsegpt_with_masks  # noqa: E402
from jaxshrink.tree import flatten  # noqa: E402

MESHES = {"dp8": ((8,), ("data",)), "mp2x4": ((2, 4), ("data", "model")),
          "mp4x2": ((4, 2), ("data", "model"))}  # fmt: skip
_GATHER = re.compile(r"= \w+\[([\d,]*)\][^\n]*? all-gather(?:-start)?\(")


def compiled_run(fn, *args, sizes: set[int]):
  """`jit(fn)(*args)` compiled once; returns the output and the all-gathers in the program
  whose result is as large as a whole sharded parameter (their shapes)."""
  compiled = jax.jit(fn).lower(*args).compile()
  found = set()
  for dims in _GATHER.findall(compiled.as_text()):
    shape = tuple(int(d) for d in dims.split(",") if d)
    if int(np.prod(shape)) in sizes:
      found.add(str(shape))
  return compiled(*args), sorted(found)


def layout_errors(out, like, what: str) -> list[str]:
  """Leaves of `out` whose sharding differs from `like`'s (a sharding or a tree of them)."""
  errors = []
  for (path, leaf), want in zip(flatten(out).items(), jax.tree.leaves(like), strict=True):
    if leaf.ndim == 0 or want.is_fully_replicated:  # XLA may split a replicated leaf: fine
      continue
    if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
      errors.append(f"{what}:{path} {leaf.sharding} != {want.spec}")
  return errors


def encoding_layout_errors(path: str, enc, weight_sharding) -> list[str]:
  """Array fields of an encoding not laid out as `distributed.encoding_shardings` says."""
  want = distributed.encoding_shardings(enc, weight_sharding)
  return [
    f"{path}.{field}: {a.sharding} != {want[field].spec}"
    for field, a in distributed.encoding_arrays(enc).items()
    if not a.sharding.is_equivalent_to(want[field], a.ndim)
  ]


def max_err(a, b) -> float:
  errs = [
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  ]
  return max(errs, default=0.0)


def exact(a, b) -> bool:
  return all(
    np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


RESULTS: dict[str, dict] = {}


def run() -> dict:
  model = get_model("digits-cnn")
  host = jax.device_get(model.init(jax.random.key(0)))
  teacher_host = jax.device_get(model.init(jax.random.key(1)))
  rng = np.random.default_rng(0)
  x_host = rng.normal(size=(32, 8, 8, 1)).astype(np.float32)
  y_host = rng.integers(0, 10, size=32).astype(np.int32)
  one = jax.devices()[0]
  single = jax.device_put(host, one)
  x1, y1 = jax.device_put(x_host, one), jax.device_put(y_host, one)
  results = RESULTS

  clock = [time.perf_counter()]

  def record(name, equal, err, layout, gathered):
    now = time.perf_counter()
    results[name] = {"equal": bool(equal), "err": err, "layout": layout, "gathers": gathered,
                     "seconds": round(now - clock[0], 2)}  # fmt: skip
    clock[0] = now

  pruner_global = Pruner(".*kernel", sparsity=0.7, allocation="global")
  pruner_uniform = Pruner(".*kernel", sparsity=0.7)
  spec8 = QuantSpec(bits=8)
  spec4 = QuantSpec(bits=4, group_size=32)
  spec4pc = QuantSpec(bits=4)

  def loss_fn(p, x, y):
    return cross_entropy_loss(model.apply(p, x), y)

  tx = pruning(optax.adam(1e-2), pruner_uniform, one_shot_schedule(0))

  @jax.jit
  def prune_steps(p, state, x, y):
    grads = jax.grad(loss_fn)(p, x, y)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  # SGD: Adam's first step is ~lr * sign(g), which turns 1e-9 gradient noise into 1e-4.
  dist = distill_step(model.apply, model.apply, optax.sgd(0.1), DistillLoss(), donate=False)

  def qat_loss(w, x):
    return jnp.sum(QuantDotGeneral(mode="fake")(x, w, (((1,), (0,)), ((), ()))) ** 2)

  qat_grad = jax.value_and_grad(qat_loss)
  x_dense1 = jnp.asarray(rng.normal(size=(32, 1024)).astype(np.float32))

  # Single-device references, each computed once.
  ref = {
    "masks_uniform": jax.jit(pruner_uniform.masks)(single),
    "masks_global": jax.jit(pruner_global.masks)(single),
    "prune_step": prune_steps(single, tx.init(single), x1, y1),
    "convert": quantize_params(single, ".*kernel", spec8),
    "quantize_int4": quantize(single["dense1"]["kernel"], spec4),
    "qat_dot": jax.jit(qat_grad)(single["dense1"]["kernel"], jax.device_put(x_dense1, one)),
    "hessians": hessian.collect_hessians(model.apply, single, [x1], ".*kernel"),
  }
  teacher1 = jax.device_put(teacher_host, one)
  state1 = dist.init(single, teacher1, x1, key=jax.random.key(2))
  ref["distill"] = dist.step(state1, teacher1, x1, y1)[0].params
  # The column sweeps run on conv1 (K=9, N=32: short sweeps on 2 cores), the SVD on conv2
  # (K=288, N=64); model meshes split both on N.
  h1 = ref["hessians"]["conv1/kernel"][0]
  ref["gptq"] = gptq_kernel(single["conv1"]["kernel"], h1, spec4pc, contract_dims=(0, 1, 2))
  # `(pruned, masks)`: the masks SparseGPT applied, to compare across meshes.
  ref["sparsegpt"] = _sparsegpt_with_masks(model.apply, single, [x1], Pruner("conv1/kernel", 0.5))
  ref["svd"] = factorize_array(single["conv2"]["kernel"], 16)
  record("references", True, 0.0, [], [])

  for mesh_name, (shape, axes) in MESHES.items():
    mesh = Mesh(np.array(jax.devices()).reshape(shape), axes)
    model_axis = "model" if "model" in axes else None
    full = mesh_name != "mp4x2"  # the second model layout: convert and the QAT dot only
    eager_too = mesh_name == "mp2x4"  # eager (op by op) convert, besides the jitted one
    shardings = distributed.param_shardings(mesh, host, model_axis=model_axis)
    params = jax.device_put(host, shardings)
    replicated = NamedSharding(mesh, P())
    x = jax.device_put(x_host, NamedSharding(mesh, P("data")))
    y = jax.device_put(y_host, NamedSharding(mesh, P("data")))
    sizes = {leaf.size for leaf in jax.tree.leaves(params) if not leaf.sharding.is_fully_replicated}
    k = mesh_name + "/"

    for name, pruner in (("masks_uniform", pruner_uniform), ("masks_global", pruner_global)):
      if not full:
        continue
      masks, found = compiled_run(pruner.masks, params, sizes=sizes)
      record(k + name, exact(masks, ref[name]), 0.0, layout_errors(masks, shardings, "mask"),
             found)  # fmt: skip

    ctree, found = compiled_run(
      lambda p: quantize_params(p, ".*kernel", spec8), params, sizes=sizes
    )
    eager = quantize_params(params, ".*kernel", spec8) if eager_too else ctree
    errors = []
    for layer in ("conv1", "conv2", "dense1", "dense2"):
      for tree in (ctree, eager):
        errors += encoding_layout_errors(layer, tree[layer]["kernel"], shardings[layer]["kernel"])
    record(k + "convert", exact(ctree, ref["convert"]) and exact(eager, ref["convert"]), 0.0,
           errors, found)  # fmt: skip

    w = params["dense1"]["kernel"]
    if full:
      q4, found = compiled_run(lambda w: quantize(w, spec4), w, sizes=sizes)
      record(k + "quantize_int4", exact(q4, ref["quantize_int4"]), 0.0,
             encoding_layout_errors("dense1/kernel", q4, w.sharding), found)  # fmt: skip

    xd = jax.device_put(x_dense1, NamedSharding(mesh, P("data")))
    (value, grad), found = compiled_run(qat_grad, w, xd, sizes=sizes)
    err = max_err((float(value) / float(ref["qat_dot"][0]), grad), (1.0, ref["qat_dot"][1]))
    record(k + "qat_dot", err < 1e-4, err, layout_errors({"g": grad}, [w.sharding], "grad"),
           found)  # fmt: skip
    if not full:
      continue

    state = tx.init(params)
    (new, new_state), found = compiled_run(prune_steps, params, state, x, y, sizes=sizes)
    ref_p, ref_state = ref["prune_step"]
    err = max(max_err(new, ref_p), max_err(new_state.inner_state, ref_state.inner_state))
    record(k + "prune_step", err < 1e-4 and exact(new_state.masks, ref_state.masks), err,
           layout_errors(new, shardings, "param")
           + layout_errors(new_state.masks, shardings, "mask"), found)  # fmt: skip

    teacher = jax.device_put(teacher_host, shardings)
    state = dist.init(params, teacher, x, key=jax.random.key(2))
    (out, _), found = compiled_run(dist.step, state, teacher, x, y, sizes=sizes)
    err = max_err(out.params, ref["distill"])
    record(k + "distill", err < 1e-4, err, layout_errors(out.params, shardings, "param"),
           found)  # fmt: skip

    hs = hessian.collect_hessians(model.apply, params, [x], ".*kernel")
    err = max(max_err(hs[p][0], ref["hessians"][p][0]) / float(jnp.max(jnp.abs(hs[p][0])))
              for p in hs)  # fmt: skip
    record(k + "hessians", err < 1e-5, err, [], [])

    # Same Hessian as the reference, so any difference would come from the sweep itself.
    wc = params["conv1"]["kernel"]
    qg = gptq_kernel(wc, jax.device_put(h1, replicated), spec4pc, contract_dims=(0, 1, 2))
    record(k + "gptq", exact(qg, ref["gptq"]), 0.0,
           encoding_layout_errors("conv1/kernel", qg, wc.sharding), [])  # fmt: skip
    # Calibration rows replicated: a data-split Gram sums rows in another order (1e-7), which
    # may flip a tied SparseGPT choice; the data-split Hessians are checked above.
    x_rep = jax.device_put(x_host, replicated)
    pruned, masks = _sparsegpt_with_masks(model.apply, params, [x_rep], Pruner("conv1/kernel", 0.5))
    err = max_err(pruned, ref["sparsegpt"][0])
    record(k + "sparsegpt", err < 1e-4 and exact(masks, ref["sparsegpt"][1]), err,
           layout_errors({"w": pruned["conv1"]["kernel"], "m": masks["conv1"]["kernel"]},
                         [wc.sharding, wc.sharding], "sparsegpt"), [])  # fmt: skip
    w2 = params["conv2"]["kernel"]
    lr = factorize_array(w2, 16)
    err = max_err(lr.materialize(), ref["svd"].materialize())
    record(k + "svd", err < 1e-4, err, encoding_layout_errors("conv2/kernel", lr, w2.sharding),
           [])  # fmt: skip
  return results


if __name__ == "__main__":
  from jaxshrink.data import cache_dir

  jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  start = time.perf_counter()
  try:
    run()
  except Exception as e:  # reported in the JSON, so the test names the failing check
    import traceback

    RESULTS["_error"] = f"{type(e).__name__}: {str(e)[:1000]}\n" + traceback.format_exc()[-1500:]
  RESULTS["_seconds"] = round(time.perf_counter() - start, 1)
  json.dump(RESULTS, sys.stdout)
