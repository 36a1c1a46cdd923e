"""Installed packages that ship data: where their files are and which release is installed.

Data packages (the MiniLM weights, WordNet's database, the packages whose docstrings build the
corpus) are located and read as files, never imported: importing one would run its code, and
the corpus would depend on whatever that code does at import time. Their release numbers go
into cache keys, so a new release rebuilds what was derived from the old one.
"""

from __future__ import annotations

import importlib.util
import pathlib
from importlib.metadata import PackageNotFoundError, version


def package_dir(module: str) -> pathlib.Path | None:
  """The folder of an installed package (`module` as imported), or None; imports nothing."""
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    return None
  return pathlib.Path(next(iter(spec.submodule_search_locations)))


def installed_version(dist: str, missing: str = "absent") -> str:
  """The installed release of distribution `dist` (as pip names it), or `missing`."""
  try:
    return version(dist)
  except PackageNotFoundError:
    return missing
