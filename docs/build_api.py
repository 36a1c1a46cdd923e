"""Builds the API reference: HTML from the docstrings of every jaxshrink module, with pdoc.

Run `python docs/build_api.py` (writes `docs/api/`, not committed) or `--out DIR`;
`tests/test_api_reference.py` builds it in CI and fails on any pdoc warning (an annotation
pdoc cannot resolve, a broken cross-reference), so the reference never silently rots.
"""

from __future__ import annotations

import argparse
import pkgutil
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# pdoc resolves a NamedTuple's generated `__init__` annotations outside its module, so under
# `from __future__ import annotations` it cannot see `Any`/`Callable`; the fields themselves
# are documented. Warnings about exactly these are expected; any other fails the test.
NAMEDTUPLE_INIT = re.compile(
  r"Error parsing type annotation .* for jaxshrink\.(distill\.step\.DistillState|"
  r"distill\.step\.DistillStep|sparsity\.wrapper\.PruneState)\.__init__\."
)


def modules() -> list[str]:
  """`jaxshrink` and every module under it, sorted (the reference covers all of them)."""
  import jaxshrink

  found = pkgutil.walk_packages(jaxshrink.__path__, prefix="jaxshrink.")
  return ["jaxshrink", *sorted(m.name for m in found)]


def build(out: Path) -> list[Path]:
  """Writes the HTML reference into `out`; returns the module pages written."""
  import pdoc

  import jaxshrink

  # pdoc walks a package's submodules itself: name the top level and its direct children.
  children = sorted(m.name for m in pkgutil.iter_modules(jaxshrink.__path__, "jaxshrink."))
  pdoc.render.configure(docformat="google", search=True, show_source=False)
  pdoc.pdoc("jaxshrink", *children, output_directory=out)
  return sorted(out.rglob("*.html"))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=ROOT / "docs" / "api", help="output directory")
  args = parser.parse_args(argv)
  pages = build(args.out)
  print(f"{len(pages)} pages in {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
