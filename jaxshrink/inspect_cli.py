"""`jaxshrink inspect DIR`: what a checkpoint stores, read from its manifest alone.

The per-leaf size table, the total against float32, every kernel a prune stage kept dense and
why, the per-kernel choices of a search stage, and the serving mode recorded when it was
compressed. `--recipe` prints the recipe with each search replaced by the stages it found.
The manifest is untrusted input: what it records is shown as plain text, and only when well
formed.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from jaxshrink.errors import UsageError


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
  p = sub.add_parser("inspect", parents=[common], help="per-leaf size table (manifest only)")
  p.add_argument("dir", help="checkpoint directory")
  p.add_argument("--json", action="store_true", help="print the table as JSON")
  p.add_argument(
    "--recipe", action="store_true",
    help="print only the recipe as YAML, each search stage replaced by the stages it found "
    "(one override per kernel)",
  )  # fmt: skip
  p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
  from jaxshrink import export
  from jaxshrink.report import TreeReport, console, format_bytes
  from jaxshrink.search.cli import print_search

  manifest = export.read_manifest(args.dir)
  if args.recipe:
    _print_searched_recipe(manifest)
    return 0
  report = TreeReport.from_json({"layers": manifest["leaves"]})
  payload = {
    **report.to_json(),
    "disk_bytes": export.disk_bytes(args.dir),
    "model": manifest.get("model"),
    "metrics": manifest.get("metrics", {}),
  }
  if args.json:
    print(json.dumps(payload, indent=2))
    return 0
  out = console()
  out.print(report.table(title=f"{args.dir} ({manifest.get('model')})"))
  native = "" if report.all_float32 else (
    f"; {report.native_ratio:.2f}x against {format_bytes(report.native_bytes)} in the model's "
    "own dtypes")  # fmt: skip
  out.print(
    f"{format_bytes(report.total_bytes)} stored for {format_bytes(report.float32_bytes)} of "
    f"float32 ({report.ratio:.2f}x{native}); {format_bytes(payload['disk_bytes'])} on disk with "
    "the manifest and orbax metadata (read from the manifest only)."
  )
  print_kept_dense(out, payload["metrics"].get("stages"))
  print_search(out, payload["metrics"].get("stages"))
  recorded = payload["metrics"].get("serving")
  if _valid_serving(recorded):
    from jaxshrink.serving import SINGLE_MAX_ROWS, mode_label

    others = ", ".join(
      f"{mode} {ratio:.2f}x" for mode, ratio in recorded["time_vs_float_by_mode"].items()
    )
    out.print(
      f"serving mode: {mode_label(recorded['serving_mode'], report.compressed)} "
      f"({recorded['time_vs_float']:.2f}x the float "
      f"model's time on {recorded.get('backend')}, batch {tuple(recorded.get('batch_shape', ()))}"
      + (f"; every mode: {others}" if others else "")
      + "), as measured when compressed"
    )
    single = recorded.get("single")
    if _valid_serving(single):
      out.print(
        f"one request: {mode_label(single['serving_mode'], report.compressed)} "
        f"({single['time_vs_float']:.2f}x the float model's time, batch "
        f"{tuple(single['batch_shape'])}); `serving.recorded_mode` picks it for batches of up "
        f"to {SINGLE_MAX_ROWS} rows"
      )
  return 0


def _print_searched_recipe(manifest: dict[str, Any]) -> None:
  """The checkpoint's recipe with each search replaced by the stages it found, as YAML."""
  import yaml

  from jaxshrink.search.stage import searched_recipe

  recipe, stages = manifest.get("recipe"), manifest.get("metrics", {}).get("stages")
  if not isinstance(recipe, dict) or not isinstance(stages, list):
    raise UsageError("This checkpoint records no recipe and stage log to rebuild a recipe from.")
  try:
    plain = searched_recipe({k: v for k, v in recipe.items() if k != "params" or v}, stages)
  except (StopIteration, KeyError, TypeError, AttributeError):
    raise UsageError(
      "This checkpoint's recipe has no search stage with a recorded result."
    ) from None
  print(yaml.safe_dump(plain, sort_keys=False, width=100), end="")


def print_kept_dense(console, stages: Any) -> None:
  """Each kernel a prune stage left dense, with why (read from untrusted input: no markup)."""
  for stage in stages if isinstance(stages, list) else []:
    pruned = stage.get("pruned") if isinstance(stage, dict) else None
    kept = pruned.get("kept_dense") if isinstance(pruned, dict) else None
    for path, reason in kept.items() if isinstance(kept, dict) else ():
      console.print(f"{path}: {reason}", markup=False, highlight=False)


def _valid_serving(recorded: Any) -> bool:
  """A well-formed `metrics.serving` record (the manifest is untrusted: else nothing shown)."""
  from jaxshrink.serving import MODES

  if not isinstance(recorded, dict) or recorded.get("serving_mode") not in MODES:
    return False
  ratios = recorded.get("time_vs_float_by_mode")
  numbers = [
    recorded.get("time_vs_float"),
    *(ratios.values() if isinstance(ratios, dict) else [None]),
  ]
  return all(isinstance(r, (int, float)) for r in numbers) and isinstance(
    recorded.get("batch_shape"), list
  )
