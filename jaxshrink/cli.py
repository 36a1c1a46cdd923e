"""The `jaxshrink` command line: demo, compress, eval, inspect, bench.

Exit codes: 0 success, 1 failure (one line naming what went wrong), 2 usage
error (one line). `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from jaxshrink.errors import JaxshrinkError, UsageError


class _Parser(argparse.ArgumentParser):
  """argparse, but a usage error is one line and exit code 2."""

  def error(self, message: str):
    print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
    raise SystemExit(2)


def _console():
  from jaxshrink.report import console

  return console()


# Reported next to `value` for embedding models (metric "cosine").
SECONDARY_METRICS = ("min_cosine", "neighbour_agreement")


def _print_json(payload: dict[str, Any]) -> None:
  print(json.dumps(payload, indent=2))


def cmd_compress(args) -> int:
  from jaxshrink import recipes

  compress_and_save(recipes.load_recipe(args.recipe), args, title=args.recipe)
  return 0


def compress_and_save(recipe: Any, args: Any, *, title: str) -> Any:
  """Runs `recipe`, saves the checkpoint to `args.out` and prints its summary (`compress` and
  `autocompress`); returns the `CompressResult`."""
  from jaxshrink import export, recipes
  from jaxshrink.inspect_cli import print_kept_dense
  from jaxshrink.search.cli import print_search

  out = Path(args.out)
  if (out.exists() or out.is_symlink()) and not args.overwrite:
    raise UsageError(f"`{out}` already exists; pass --overwrite to replace it.")
  export.check_overwrite(out.absolute())  # before the recipe runs: never lose a run to it
  result = recipes.run_recipe(recipe, progress=not args.json)
  model = result.pipeline.model
  export.save(
    out,
    result.pipeline.tree,
    model=result.pipeline.model_source,
    data=recipe.data or model.data,
    recipe={**recipe.raw, "params": recipe.params},
    metrics=result.metrics,
    overwrite=args.overwrite,
  )
  summary = {
    "out": str(out),
    "model": recipe.model,
    **{k: result.metrics.get(k) for k in ("metric", "value", "reference_value")},
    **{k: result.metrics[k] for k in SECONDARY_METRICS if k in result.metrics},
    **{k: v for k, v in result.report.to_json().items() if k != "layers"},
    **{k: result.metrics[k] for k in ("float_model_bytes", "ratio_vs_float_model")},
    "disk_bytes": export.disk_bytes(out),
    "seconds": result.metrics["seconds"],
    "layers": result.report.to_json()["layers"],
  }
  if args.json:
    _print_json(summary)
    return result
  console = _console()
  console.print(result.report.table(title=f"{recipe.name or title} -> {out}"))
  print_kept_dense(console, result.metrics.get("stages"))
  print_search(console, result.metrics.get("stages"))
  if "value" in result.metrics:
    smaller = f"{result.report.ratio:.2f}x smaller than float32"
    if result.metrics["float_model_bytes"] != result.report.float32_bytes:  # a smaller model
      smaller = (f"{result.metrics['ratio_vs_float_model']:.2f}x smaller than the float32 model "
                 f"({result.report.ratio:.2f}x against its own float32 size)")  # fmt: skip
    console.print(
      f"{model.metric}: {result.metrics['value']:.4f} "
      f"(float reference {result.metrics['reference_value']:.4f}); "
      f"{summary['disk_bytes']} bytes on disk; {smaller}"
      + "".join(f"; {k} {result.metrics[k]:.4f}" for k in SECONDARY_METRICS if k in result.metrics)
    )
  return result


def cmd_eval(args) -> int:
  import dataclasses

  from jaxshrink import data, evaluation, export, serving
  from jaxshrink.data.sources import checkpoint_data_source
  from jaxshrink.models.registry import manifest_model
  from jaxshrink.reference import float_reference

  manifest = export.read_manifest(args.dir)
  # The checkpoint is untrusted: what it names is resolved among zoo names only; code to
  # import comes from the flags the user types.
  model = manifest_model(manifest, args.dir, source=args.model)
  source = args.data or manifest["data"] or model.data
  dataset = None
  if not args.data and manifest["data"]:  # named by the checkpoint: a zoo dataset only
    dataset = checkpoint_data_source(source, field="data", where=args.dir)
  reference_model, reference_params = float_reference(
    manifest, model, where=args.dir, reference_model=args.reference_model
  )
  if dataset is not None:
    pass
  elif model.metric == "cosine" and source.lower().endswith(".txt"):
    # One sentence per line; the targets are the float model's embeddings of them.
    from jaxshrink.data.sentences import read_sentences, sentence_dataset

    dataset = sentence_dataset(
      read_sentences(source), source, apply=reference_model.apply, params=reference_params
    )
  else:
    dataset = data.load_data_source(source)  # typed by the user, or the model's own default
  model, reference_model = _with_metric(args, manifest, model, reference_model, dataset)
  tree = export.load(args.dir)
  if args.batch_size < 1:
    raise UsageError(f"`--batch-size` must be >= 1; got {args.batch_size}.")
  mode = _serving_mode(args, manifest)
  served = serving.serve(model.apply, tree, mode)
  measured = evaluation.evaluate_metrics(
    dataclasses.replace(model, apply=served.apply), served.params, dataset, served=True
  )
  value = measured.pop("value")
  reference = evaluation.evaluate_tree(reference_model, reference_params, dataset)
  timing = serving.measure(
    model.apply, tree, reference_params, (evaluation.timing_batch(dataset, args.batch_size),),
    modes=(mode,), float_apply=reference_model.apply,
  )  # fmt: skip
  payload = {
    "checkpoint": str(args.dir),
    "model": args.model or manifest["model"],
    "data": source,
    "metric": model.metric,
    "higher_is_better": model.higher_is_better,
    "value": value,
    "reference_value": reference,
    **measured,
    "serving_mode": mode,
    "seconds_per_batch": timing.seconds_per_batch[mode],
    "float_seconds_per_batch": timing.seconds_per_batch["float"],
    "time_vs_float": timing.time_vs_float[mode],
    "batch_shape": list(timing.batch_shape),
  }
  if args.json:
    _print_json(payload)
  else:
    extra = "".join(f"; {k} {v:.4f}" for k, v in measured.items())
    print(f"{model.metric} on {source}: {value:.4f} (float reference {reference:.4f}){extra}")
    from jaxshrink.report import TreeReport

    compressed = TreeReport.from_json({"layers": manifest["leaves"]}).compressed
    print(
      f"serving mode {serving.mode_label(mode, compressed)}: "
      f"{payload['seconds_per_batch'] * 1e3:.3g} ms per batch of "
      f"{tuple(timing.batch_shape)}, {payload['time_vs_float']:.2f}x the float model's time "
      "(timed side by side)"
    )
  return 0


def _with_metric(args, manifest: dict[str, Any], model: Any, reference: Any, dataset: Any):
  """The model and its reference scored with `--metric`; a user model without it takes the
  built-in metric the checkpoint recorded, else its data's default. The checkpoint is
  untrusted: a metric it names as code is never imported, the user passes it."""
  from jaxshrink.models.base import METRICS
  from jaxshrink.models.registry import default_metric, load_metric, with_metric

  if args.metric is not None:
    higher = None if args.metric_direction is None else args.metric_direction == "higher"
    fields = load_metric(args.metric, higher_is_better=higher)
  elif args.metric_direction is not None:
    raise UsageError("`--metric-direction` goes with `--metric pkg.mod:fn`.")
  elif model.framework == "user":
    recorded = (manifest.get("metrics") or {}).get("metric")
    if isinstance(recorded, str) and recorded in METRICS:
      fields = {"metric": recorded}
    elif recorded is not None:
      raise UsageError(
        f"`{args.dir}` was scored with the metric {str(recorded)[:200]!r}, code that a "
        "checkpoint never makes jaxshrink import; pass it yourself: --metric pkg.mod:fn."
      )
    else:
      fields = {"metric": default_metric(dataset.kind)}
  else:
    return model, reference
  return with_metric(model, fields), with_metric(reference, fields)


def _serving_mode(args, manifest: dict[str, Any]) -> str:
  """`--serving`, else the mode the checkpoint recorded for `--batch-size` rows (checked: the
  manifest is untrusted input)."""
  from jaxshrink import serving

  if args.serving is not None:
    return serving.check_mode(args.serving, where="`--serving`")
  recorded = (manifest.get("metrics") or {}).get("serving")
  if not isinstance(recorded, dict) or "serving_mode" not in recorded:
    return serving.DEFAULT_MODE
  return serving.recorded_mode(recorded, args.batch_size, source=f"`{args.dir}`")


def cmd_export(args) -> int:
  from jaxshrink import export

  manifest = export.read_manifest(args.dir)
  out = Path(args.out)
  if args.to == "safetensors":
    from jaxshrink.export.overwrite import check_overwrite_file
    from jaxshrink.export.safetensors_io import LAYOUT_KEY

    if (out.exists() or out.is_symlink()) and not args.overwrite:
      raise UsageError(f"`{out}` already exists; pass --overwrite to replace it.")
    check_overwrite_file(out, LAYOUT_KEY)  # replaces only a safetensors file jaxshrink wrote
    tree = export.load(args.dir)
    export.export_safetensors(
      tree, out, metadata={"model": manifest.get("model") or "", "source": str(args.dir)}
    )
    print(f"wrote {out} ({out.stat().st_size} bytes) from {args.dir}")
    return 0
  from jaxshrink.interop.directory import check_export_target
  from jaxshrink.models.registry import manifest_model

  check_export_target(out.absolute(), overwrite=args.overwrite)  # before any loading
  model = manifest_model(manifest, args.dir, source=args.model)
  tree = export.load(args.dir)
  from jaxshrink.data.registry import tokenizer_files
  from jaxshrink.interop import hf

  write = hf.export_hf if args.to == "hf" else hf.export_compressed_tensors
  # The tokenizer of the model's zoo data goes along, so a server reads text as it is.
  tokenizer = tokenizer_files(model.data)
  out = write(tree, model, out, overwrite=args.overwrite, tokenizer=tokenizer)
  size = sum(f.stat().st_size for f in out.iterdir())
  print(f"wrote {out} ({args.to}, {size} bytes) from {args.dir}")
  return 0


def cmd_demo(args) -> int:
  from jaxshrink import demo

  demo.run_demo(Path(args.out), quick=args.quick)
  return 0


def cmd_bench(args) -> int:
  from jaxshrink import bench

  bench.run_benchmarks(
    suites=[args.suite] if args.suite else None,
    json_out=Path(args.json) if args.json else None,
    directory=Path(args.dir) if args.dir else None,
  )
  return 0


def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--debug", action="store_true", help="show the traceback on failure")
  parser = _Parser(
    prog="jaxshrink",
    description="Make trained JAX/Flax networks smaller: quantize, prune, distill, factorize, "
    "and export compact checkpoints.",
    parents=[common],
  )
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
  sub.required = True

  p = sub.add_parser("demo", parents=[common], help="run every technique on digits-cnn")
  p.add_argument("--quick", action="store_true", help="fewer methods, under a minute")
  p.add_argument("--out", default="jaxshrink-demo", help="output dir (default: %(default)s)")
  p.set_defaults(func=cmd_demo)

  p = sub.add_parser("compress", parents=[common], help="run a YAML recipe, write a checkpoint")
  p.add_argument("recipe", help="recipe YAML file")
  p.add_argument("--out", required=True, help="checkpoint directory to write")
  p.add_argument(
    "--overwrite", action="store_true", help="replace an existing checkpoint (or empty dir) --out"
  )
  p.add_argument("--json", action="store_true", help="print the summary as JSON")
  p.set_defaults(func=cmd_compress)

  p = sub.add_parser("eval", parents=[common], help="evaluate a checkpoint against float")
  p.add_argument("dir", help="checkpoint directory")
  p.add_argument(
    "--model",
    help="zoo model or module:factory to evaluate with; the factory may return your own model "
    "(an nnx module, a (linen module, variables) pair, an (apply, params) pair) (default: the "
    "zoo model the checkpoint names; a checkpoint never makes jaxshrink import code)",
  )
  p.add_argument(
    "--reference-model",
    help="zoo model or module:factory of the float reference, when it differs from --model "
    "(e.g. a distillation teacher)",
  )
  p.add_argument(
    "--data",
    help="zoo data name, module:factory, a .npz/.txt file or a directory of .npy files (for an "
    "embedding model such as minilm-l6, a .txt file holds one sentence per line)",
  )
  p.add_argument(
    "--metric",
    help="accuracy, perplexity, cosine, or your own as module:fn, `fn(outputs, labels) -> "
    "float` on the whole test split (default: the model's; for your own model, the built-in "
    "metric the checkpoint recorded, else the data's default)",
  )
  p.add_argument(
    "--metric-direction",
    choices=["higher", "lower"],
    help="whether a larger value of --metric is better (default: its `higher_is_better`)",
  )
  p.add_argument(
    "--serving",
    metavar="MODE",
    help="serving mode to run and time: integer, bfloat16, decode-once or factored (default: "
    "the mode the checkpoint recorded as fastest when it was compressed, for one request when "
    "--batch-size is 8 or less, else for a batch; integer when it recorded none)",
  )
  p.add_argument(
    "--batch-size",
    type=int,
    default=64,
    help="test rows in the timed batch (the float model is timed on the same batch)",
  )
  p.add_argument("--json", action="store_true", help="print the result as JSON")
  p.set_defaults(func=cmd_eval)

  from jaxshrink.generate_cli import add_parser as add_generate

  add_generate(sub, common)

  from jaxshrink.inspect_cli import add_parser as add_inspect

  add_inspect(sub, common)

  from jaxshrink.search.cli import add_parser as add_autocompress

  add_autocompress(sub, common)

  p = sub.add_parser(
    "export",
    parents=[common],
    help="convert a checkpoint to safetensors, a Hugging Face or a compressed-tensors directory",
  )
  p.add_argument("dir", help="checkpoint directory")
  p.add_argument(
    "--to",
    choices=["safetensors", "hf", "compressed-tensors"],
    required=True,
    help="safetensors: one file in jaxshrink's layout; hf: config.json + model.safetensors "
    "(float) for transformers; compressed-tensors: the same with packed quantized weights, "
    "for vLLM and the JAX serving stacks",
  )
  p.add_argument("out", help="output file (safetensors) or directory (hf, compressed-tensors)")
  p.add_argument("--model", help="module:factory of the model, if the checkpoint names none")
  p.add_argument("--overwrite", action="store_true", help="replace an output jaxshrink wrote")
  p.set_defaults(func=cmd_export)

  p = sub.add_parser("bench", parents=[common], help="run benchmarks/, regenerate BENCHMARKS.md")
  p.add_argument("--suite", help="one suite name (default: all)")
  p.add_argument("--json", metavar="OUT", help="also write all records to this JSON file")
  p.add_argument("--dir", help="benchmarks directory (default: the repository's benchmarks/)")
  p.set_defaults(func=cmd_bench)
  return parser


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())


def _format_warning(message, category, filename, lineno, line=None) -> str:
  # Users act on the message (it names the leaf and the fallback), not on our source line.
  return f"jaxshrink: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if not args.debug:
    warnings.formatwarning = _format_warning
  try:
    return args.func(args)
  except UsageError as e:
    if args.debug:
      traceback.print_exc()
    print(f"jaxshrink: error: {_one_line(e)}", file=sys.stderr)
    return 2
  except (JaxshrinkError, ValueError, TypeError, OSError) as e:
    if args.debug:
      traceback.print_exc()
    print(f"jaxshrink: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("jaxshrink: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
