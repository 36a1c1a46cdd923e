"""`jaxshrink autocompress RECIPE_OR_MODEL --out DIR`: search, write the checkpoint and the
plain recipe that reproduces it; and the per-kernel table `jaxshrink inspect` shows.

The argument is a recipe with a `search` stage, a recipe without one (a search is appended
after its stages), or a model (zoo name or `module:factory`, with `--data` for your own).
Flags set the search's options. The plain recipe (`--recipe-out`, default `DIR.yaml`) has
one override per kernel in place of the search; `jaxshrink compress` of it rebuilds the
same tree bit for bit.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml

from jaxshrink.errors import UsageError


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
  p = sub.add_parser(
    "autocompress", parents=[common],
    help="search per-kernel compression within an accuracy budget, write checkpoint and recipe",
  )  # fmt: skip
  p.add_argument("target", metavar="RECIPE_OR_MODEL", help="recipe YAML, zoo model or pkg.mod:fn")
  p.add_argument("--out", required=True, help="checkpoint directory to write")
  p.add_argument("--data", help="data for a model given by name (default: the zoo model's)")
  p.add_argument(
    "--max-drop", type=float,
    help="allowed relative loss of the metric on held-out training rows (search default 0.005)",
  )  # fmt: skip
  p.add_argument(
    "--max-bytes",
    help="cap on stored bytes: a number, or a candidate name (that candidate on every kernel)",
  )
  p.add_argument(
    "--candidates", help="comma-separated, e.g. float,bf16,int8,int4-g128,int4-g32,int3-g32"
  )
  p.add_argument("--embedding-bits", type=int, choices=[8, 4], help="also quantize gathered tables")
  p.add_argument("--recipe-out", help="plain recipe YAML to write (default: DIR.yaml)")
  p.add_argument("--overwrite", action="store_true", help="replace --out and --recipe-out")
  p.add_argument("--json", action="store_true", help="print the summary as JSON")
  p.set_defaults(func=cmd_autocompress)


def _search_options(args: argparse.Namespace) -> dict[str, Any]:
  options: dict[str, Any] = {}
  if args.max_drop is not None:
    options["max_drop"] = args.max_drop
  if args.max_bytes is not None:
    options["max_bytes"] = int(args.max_bytes) if args.max_bytes.isdigit() else args.max_bytes
    if args.max_drop is None:
      options["max_drop"] = None  # a size cap alone: the best point under it
  if args.candidates:
    options["candidates"] = [c.strip() for c in args.candidates.split(",") if c.strip()]
  if args.embedding_bits:
    options["embeddings"] = {"bits": args.embedding_bits}
  return options


def search_recipe(args: argparse.Namespace) -> dict[str, Any]:
  """The raw recipe `autocompress` runs: the file's (search options set by the flags), or a
  model's with one search stage."""
  path = Path(args.target)
  options = _search_options(args)
  if path.suffix in (".yaml", ".yml") or path.is_file():
    from jaxshrink.recipes import load_recipe

    raw = dict(load_recipe(path).raw)
    if args.data:
      raw["data"] = args.data
    stages, found = [], False
    for entry in raw.get("stages") or []:
      if isinstance(entry, dict) and "search" in entry:
        found = True
        entry = {"search": {**(entry["search"] or {}), **options}}
      stages.append(entry)
    if not found:
      stages.append({"search": options})
    return {**raw, "stages": stages}
  raw: dict[str, Any] = {"model": args.target, "stages": [{"search": options}]}
  if args.data:
    raw["data"] = args.data
  return raw


def write_recipe(path: Path, raw: dict[str, Any], *, overwrite: bool) -> None:
  """Writes the YAML whole or not at all (a temporary file renamed over the target)."""
  if path.exists() and not overwrite:
    raise UsageError(f"`{path}` already exists; pass --overwrite to replace it.")
  text = yaml.safe_dump(raw, sort_keys=False, width=100)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def cmd_autocompress(args: argparse.Namespace) -> int:
  from jaxshrink.cli import compress_and_save
  from jaxshrink.recipes import parse_recipe
  from jaxshrink.search.stage import searched_recipe

  raw = search_recipe(args)
  recipe = parse_recipe(raw, source=f"`{args.target}`")
  out = Path(args.out)
  recipe_out = Path(args.recipe_out) if args.recipe_out else out.with_name(out.name + ".yaml")
  if recipe_out.exists() and not args.overwrite:
    raise UsageError(f"`{recipe_out}` already exists; pass --overwrite to replace it.")
  result = compress_and_save(recipe, args, title=f"autocompress {args.target}")
  plain = searched_recipe(recipe.raw, result.metrics["stages"])
  plain["name"] = f"{recipe.name or recipe.model} (searched)"
  write_recipe(recipe_out, plain, overwrite=args.overwrite)
  if not args.json:
    print(f"wrote {recipe_out}: `jaxshrink compress {recipe_out} --out DIR` rebuilds {out}")
  return 0


# How `print_search` names each `validation_data` source (read from an untrusted manifest).
VALIDATION_WORDS = {
  "test": "test rows",
  "train": "training rows calibration never read",
  "corpus": "held-out sentences of the transfer corpus",
}


def print_search(console: Any, stages: Any) -> None:
  """The per-kernel choice of each search stage in a run's log (untrusted: plain text only)."""
  from rich.table import Table
  from rich.text import Text

  from jaxshrink.report import format_bytes

  for stage in stages if isinstance(stages, list) else []:
    found = stage.get("search") if isinstance(stage, dict) else None
    layers = found.get("layers") if isinstance(found, dict) else None
    if not isinstance(layers, list):
      continue
    table = Table(title="search: one candidate per kernel")
    for column in ("kernel", "candidate", "bytes", "output error"):
      table.add_column(column, justify="left" if column in ("kernel", "candidate") else "right")
    for layer in layers:
      if not isinstance(layer, dict):
        continue
      size, error = layer.get("bytes"), layer.get("error")
      table.add_row(
        Text(str(layer.get("path"))), Text(str(layer.get("candidate"))),
        format_bytes(size) if isinstance(size, (int, float)) else "?",
        f"{error:.2e}" if isinstance(error, (int, float)) else "?",
      )  # fmt: skip
    console.print(table)
    check = found.get("validation")
    if isinstance(check, dict) and all(
      isinstance(check.get(k), (int, float)) for k in ("value", "reference", "drop", "rows")
    ):
      console.print(
        f"verified on {check['rows']} {VALIDATION_WORDS.get(check.get('data'), 'rows')}"
        f": {check['value']:.5f} against "
        f"{check['reference']:.5f} (relative drop {check['drop']:.5f}), after "
        f"{len(found.get('iterations') or [])} verifications",
        markup=False, highlight=False,
      )  # fmt: skip
