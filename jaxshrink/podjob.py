"""The pod job: a recipe's training-time compression on a sharded model, run by every host.

Every process (one per TPU VM worker, or several CPU processes in tests) runs the same
command; together they train on one global batch split over all devices and write one
checkpoint:

    python -m jaxshrink.podjob --recipe tpu/recipes/digits-cnn-prune-qat.yaml --out OUT \\
        [--model-parallel N] [--steps N] [--batch-size B] \\
        [--coordinator HOST:PORT --num-processes N --process-id I]
    python -m jaxshrink.podjob --evaluate OUT [--model-parallel N] [...the same flags]

On a TPU VM pod no distributed flag is needed: `jax.distributed.initialize()` reads the
workers from the TPU metadata. The recipe's `prune` stage (method `gradual`) and
`quantize` stage (method `qat`) are trained jointly, in one loop: the pruning optax
wrapper keeps the weights sparse while `qat_apply` fake-quantizes them, both from the first
step. The job writes

- `OUT/train/`: a multi-host orbax checkpoint of the float params and masks (each process
  writes its own shards; on a pod without a shared disk, make `--out` a `gs://` bucket or
  pass `--train-dir gs://...` for this part);
- `OUT/compact/`: the compact checkpoint (`jaxshrink.export.save`; process 0 writes it,
  the others wait), loadable by `jaxshrink eval` / `inspect`;
- `OUT/result.json` (process 0): steps, losses, sparsity and test accuracy.

`--evaluate OUT` restores both checkpoints in fresh processes and writes
`OUT/evaluate.json` with the accuracy of the compact model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxshrink import distributed
from jaxshrink.errors import JaxshrinkError, UsageError

# Stage kinds (and methods) the job trains jointly; the rest belong to `jaxshrink compress`.
JOB_STAGES = {"prune": "gradual", "quantize": "qat"}


@dataclasses.dataclass(frozen=True)
class JobPlan:
  """What the job trains, read off a validated recipe."""

  prune: dict[str, Any] | None  # the prune stage's options, or None
  qat: dict[str, Any] | None  # the quantize stage's options, or None
  steps: int
  learning_rate: float


def job_plan(recipe: Any, steps: int | None = None) -> JobPlan:
  """Checks that the recipe holds only stages the job can train jointly.

  Raises:
    UsageError: another stage kind or method, or a recipe with nothing to train.
  """
  found: dict[str, dict[str, Any]] = {}
  for index, (kind, options) in enumerate(recipe.stages, start=1):
    method = options.get("method")
    if kind not in JOB_STAGES or method != JOB_STAGES[kind] or kind in found:
      raise UsageError(
        f"Stage {index} (`{kind}`, method {method!r}) cannot run in the pod job: it trains one "
        "`prune` stage with method `gradual` and one `quantize` stage with method `qat`, "
        "jointly. Run other stages with `jaxshrink compress` on the exported checkpoint."
      )
    found[kind] = options
  if not found:
    raise UsageError("The pod job's recipe needs a `prune` (gradual) or `quantize` (qat) stage.")
  steps = steps or max(o["steps"] for o in found.values())
  if steps < 1:
    raise UsageError(f"--steps must be >= 1; got {steps}.")
  rate = min(o["learning_rate"] for o in found.values())
  return JobPlan(found.get("prune"), found.get("quantize"), steps, rate)


def _tools(plan: JobPlan, model: Any):
  """(optimizer, loss apply, float-to-compressed function) for the plan."""
  from jaxshrink.pipeline import rule_from_options
  from jaxshrink.quant import LayerQuant, QuantSpec, qat_apply, quantize_params
  from jaxshrink.sparsity import Pruner, pruning
  from jaxshrink.sparsity.finetune import finetune_optimizer
  from jaxshrink.sparsity.schedules import schedule_from_options

  tx = finetune_optimizer(plan.learning_rate, plan.steps)
  apply, to_compact = model.apply, lambda params: params
  if plan.prune is not None:
    o = plan.prune
    pruner = Pruner(rule_from_options(o), sparsity=o["sparsity"], structure=o["structure"],
                    criterion=o["criterion"], allocation=o["allocation"],
                    overrides=o["overrides"] or {},
                    keep_dense_below=o["keep_dense_below"])  # fmt: skip
    tx = pruning(tx, pruner, schedule_from_options(o["schedule"], steps=plan.steps))
  if plan.qat is not None:
    o = plan.qat
    spec = QuantSpec(bits=o["weight_bits"], symmetric=o["symmetric"], group_size=o["group_size"],
                     format=o["format"])  # fmt: skip
    layer, rule = LayerQuant(spec, o["activation_bits"]), rule_from_options(o)
    apply = qat_apply(model.apply, rule, layer)
    to_compact = lambda params: quantize_params(params, rule, layer)  # noqa: E731
  return tx, apply, to_compact


def _accuracy(mesh, model, tree, x, y, batch: int = 120) -> float:
  """Test accuracy of a (compressed) tree, batches split over the mesh's data axis."""
  from jaxshrink.encoding import materialize

  predict = jax.jit(lambda t, xb: jnp.argmax(model.apply(materialize(t), xb), -1))
  data = mesh.shape[distributed.DATA]
  batch = max(data, batch // data * data)
  n = len(x) // batch * batch  # whole batches: every example lands on a device
  correct = 0
  for i in range(0, n, batch):
    pred = distributed.to_host(predict(tree, distributed.global_batch(mesh, x[i : i + batch])))
    correct += int(np.sum(np.asarray(pred) == y[i : i + batch]))
  return correct / n


def _put(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda a, s: jax.make_array_from_callback(np.shape(a), s, lambda i: np.asarray(a)[i]),
    tree,
    shardings,
  )


def train(args: argparse.Namespace) -> dict[str, Any]:
  """Runs the job on every process; returns process 0's result dict."""
  import orbax.checkpoint as ocp
  from jax.experimental import multihost_utils

  from jaxshrink import data, export, models
  from jaxshrink.recipes import load_float_params, load_recipe
  from jaxshrink.sparsity import masks_of

  recipe = load_recipe(args.recipe)
  plan = job_plan(recipe, args.steps)
  model = models.load_model(recipe.model)
  dataset = data.load_data_source(recipe.data or model.data)
  mesh = distributed.make_mesh(args.model_parallel)
  batch = args.batch_size or model.batch_size
  if batch % mesh.shape[distributed.DATA]:
    raise UsageError(
      f"--batch-size {batch} must divide over the {mesh.shape[distributed.DATA]}-way data axis; "
      f"use a multiple of {mesh.shape[distributed.DATA]}."
    )
  # Every process reads the float params (orbax restores are collective); process 0's copy
  # is then broadcast, so workers whose caches differ still start from the same values.
  host = load_float_params(model, recipe.params, progress=False)
  host = jax.device_get(multihost_utils.broadcast_one_to_all(host))
  model_axis = distributed.MODEL if args.model_parallel > 1 else None
  shardings = distributed.param_shardings(mesh, host, model_axis=model_axis)
  params = _put(host, shardings)
  tx, apply, to_compact = _tools(plan, model)
  from jaxshrink.models import cross_entropy_loss

  @jax.jit
  def step(p, state, x, y, key):
    if model.augment is not None:
      x = model.augment(key, x)
    loss, grads = jax.value_and_grad(lambda p: cross_entropy_loss(apply(p, x), y))(p)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss

  # The same global batches on every process, whatever the number of processes.
  rng = np.random.default_rng(recipe.seed)
  order = np.concatenate([rng.permutation(dataset.num_train)
                          for _ in range(plan.steps * batch // dataset.num_train + 1)])  # fmt: skip
  state, losses, start = tx.init(params), [], time.perf_counter()
  key = jax.random.key(recipe.seed)
  for i in range(plan.steps):
    index = order[i * batch : (i + 1) * batch]
    x = distributed.global_batch(mesh, dataset.x_train[index])
    y = distributed.global_batch(mesh, dataset.y_train[index].astype(np.int32))
    params, state, loss = step(params, state, x, y, jax.random.fold_in(key, i))
    losses.append(loss)
  losses = [float(v) for v in distributed.to_host(jnp.stack(losses))]
  train_seconds = time.perf_counter() - start
  masks = masks_of(state) if plan.prune is not None else {}

  out = Path(args.out).absolute() if "://" not in args.out else args.out
  train_dir = args.train_dir or f"{out}/train"
  with ocp.StandardCheckpointer() as ckpt:  # every process writes its own shards
    ckpt.save(train_dir, {"params": params, "masks": masks}, force=True)
    ckpt.wait_until_finished()

  tree = to_compact(params)
  accuracy = _accuracy(mesh, model, tree, dataset.x_test, dataset.y_test)
  sparsity = {p: 1.0 - float(np.mean(m)) for p, m in _flat(distributed.to_host(masks)).items()
              if np.ndim(m)}  # fmt: skip
  result = {
    "recipe": str(args.recipe), "model": recipe.model, "steps": plan.steps, "batch_size": batch,
    "processes": jax.process_count(), "devices": jax.device_count(),
    "mesh": dict(mesh.shape), "losses": losses, "train_seconds": round(train_seconds, 2),
    "accuracy": accuracy, "sparsity": sparsity,
  }  # fmt: skip
  export.save(f"{out}/compact", tree, model=recipe.model,
              data=recipe.data or model.data, recipe=recipe.raw,
              metrics={"accuracy": accuracy}, overwrite=True)  # fmt: skip
  _write_json(Path(f"{out}/result.json"), result)
  return result


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
  """Restores the job's checkpoints on a fresh set of processes and evaluates the compact one."""
  import orbax.checkpoint as ocp

  from jaxshrink import export
  from jaxshrink.data.sources import checkpoint_data_source
  from jaxshrink.models.registry import checkpoint_model

  out = Path(args.evaluate).absolute() if "://" not in args.evaluate else args.evaluate
  manifest = export.read_manifest(f"{out}/compact")
  # The checkpoint is untrusted input: it may name zoo models and datasets only.
  where = f"{out}/compact"
  model = checkpoint_model(manifest["model"], field="model", where=where)
  dataset = checkpoint_data_source(manifest["data"], field="data", where=where)
  mesh = distributed.make_mesh(args.model_parallel)
  tree = jax.device_put(export.load(f"{out}/compact"),
                        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))  # fmt: skip
  accuracy = _accuracy(mesh, model, tree, dataset.x_test, dataset.y_test)
  train_dir = args.train_dir or f"{out}/train"
  with ocp.StandardCheckpointer() as ckpt:
    meta = ckpt.metadata(train_dir).item_metadata
    model_axis = distributed.MODEL if args.model_parallel > 1 else None
    target = jax.tree.map(
      lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
      meta,
      distributed.param_shardings(mesh, meta, model_axis=model_axis),
    )
    restored = ckpt.restore(train_dir, target)
  host = distributed.to_host(restored["params"])
  params_sum = float(sum(np.abs(np.asarray(a, np.float64)).sum() for a in jax.tree.leaves(host)))
  result = {"accuracy": accuracy, "processes": jax.process_count(), "params_abs_sum": params_sum}
  _write_json(Path(f"{out}/evaluate.json"), result)
  return result


def _flat(tree: Any) -> dict[str, Any]:
  from jaxshrink.tree import flatten

  return flatten(tree) if tree else {}


def _write_json(path: Path, value: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    path.write_text(json.dumps(value, indent=1) + "\n")
  distributed.barrier(f"jaxshrink.podjob.{path.name}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m jaxshrink.podjob", description=__doc__.split(
    "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument("--recipe", help="YAML recipe with a prune (gradual) and/or qat stage")
  what.add_argument("--evaluate", metavar="OUT", help="restore OUT's checkpoints and evaluate")
  parser.add_argument("--out", help="output directory (local path or gs://bucket/dir)")
  parser.add_argument("--train-dir", help="orbax train checkpoint dir (default OUT/train)")
  parser.add_argument("--model-parallel", type=int, default=1, help="devices per model shard")
  parser.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
  parser.add_argument("--batch-size", type=int, help="global batch (default: the model's)")
  parser.add_argument("--coordinator", help="host:port of process 0 (not needed on TPU VMs)")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  args = parser.parse_args(argv)
  if args.recipe and not args.out:
    parser.error("--recipe needs --out DIR")
  return args


def main(argv: list[str] | None = None) -> int:
  """CLI entry: one line on error, exit code 2 for usage errors and 1 for the others."""
  args = parse_args(argv)
  try:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    result = evaluate(args) if args.evaluate else train(args)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except JaxshrinkError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if jax.process_index() == 0:
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
