"""What `overwrite` may replace, and which leftover staging directories a save may delete.

`save(dir, tree, overwrite=True)` swaps a finished staging directory in for `dir` and deletes
what was there, recursively. So it replaces only what jaxshrink wrote itself: an existing
checkpoint (a real directory holding a jaxshrink `manifest.json` and nothing but `arrays/`
beside it) or an empty directory. A non-empty directory of anything else (`.`, a home
directory), a regular file or a symlink (to a checkpoint or not) is refused before any work is
done, and left untouched. `jaxshrink export --overwrite` likewise replaces only a safetensors
file that jaxshrink wrote.

A save killed midway leaves its staging directory `.NAME.partial-<8 hex>` (or
`.NAME.partial-multihost<N>`) beside the target. The next save of `NAME` deletes such a
directory only when it is one jaxshrink made: a real directory (never a symlink) that is
empty, holds the staging marker written first thing, or holds a complete checkpoint (a
staging directory that had already been exchanged with the previous checkpoint).

>>> check_overwrite(Path("out/ckpt"))  # raises UsageError unless it is a checkpoint or empty
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from jaxshrink.errors import UsageError

MARKER = ".jaxshrink-staging"  # written into a staging directory before anything else
MARKER_TEXT = "jaxshrink checkpoint staging directory; safe to delete\n"
_FORMAT = "jaxshrink-checkpoint"
_MANIFEST = "manifest.json"
_CHECKPOINT_ENTRIES = {_MANIFEST, "arrays"}
_MANIFEST_PEEK = 64 << 20  # bytes read to recognise a manifest (read_manifest's own cap)


def staging_name(target: Path, suffix: str) -> str:
  return f".{target.name}.partial-{suffix}"


def _staging_pattern(target: Path) -> re.Pattern:
  return re.compile(re.escape(f".{target.name}.partial-") + r"(?:[0-9a-f]{8}|multihost\d+)")


def is_checkpoint_dir(path: Path) -> bool:
  """A real directory whose `manifest.json` is a jaxshrink manifest (any format version)."""
  manifest = path / _MANIFEST
  if path.is_symlink() or not path.is_dir() or manifest.is_symlink() or not manifest.is_file():
    return False
  try:
    if manifest.stat().st_size > _MANIFEST_PEEK:
      return False
    head = json.loads(manifest.read_bytes())
  except (OSError, ValueError, RecursionError):
    return False
  return isinstance(head, dict) and head.get("format") == _FORMAT


def _holds(path: Path, limit: int = 5) -> str:
  try:
    names = sorted(os.listdir(path))
  except OSError as e:
    return f"unreadable ({e.strerror})"
  shown = ", ".join(names[:limit]) + (
    f" and {len(names) - limit} more" if len(names) > limit else ""
  )
  return f"{len(names)} {'entry' if len(names) == 1 else 'entries'} ({shown})"


def check_overwrite(target: Path) -> None:
  """Raises `UsageError` unless `target` is absent, an empty directory or a checkpoint.

  Args:
    target: the checkpoint directory `save` is about to replace.

  Raises:
    UsageError: `target` is a symlink, a file, a non-empty directory without a jaxshrink
      manifest, or a checkpoint with other entries beside `manifest.json` and `arrays/`.
  """
  fix = "Choose a new output path, or delete it yourself if it is yours to delete."
  if target.is_symlink():
    raise UsageError(
      f"Refusing to overwrite `{target}`: it is a symlink (to `{os.readlink(target)}`), and "
      f"overwrite replaces only a real checkpoint directory. {fix}"
    )
  if not target.exists():
    return
  if not target.is_dir():
    raise UsageError(
      f"Refusing to overwrite `{target}`: it is a file, not a jaxshrink checkpoint directory. {fix}"
    )
  entries = set(os.listdir(target))
  if not entries:
    return
  if not is_checkpoint_dir(target):
    raise UsageError(
      f"Refusing to overwrite `{target}`: it is not a jaxshrink checkpoint (no jaxshrink "
      f"{_MANIFEST}) and holds {_holds(target)}. {fix}"
    )
  other = sorted(entries - _CHECKPOINT_ENTRIES)
  if other:
    raise UsageError(
      f"Refusing to overwrite checkpoint `{target}`: besides the checkpoint it holds "
      f"{', '.join(other[:5])}, which overwrite would delete. Move them out first. {fix}"
    )


def check_overwrite_file(target: Path, layout_key: str) -> None:
  """Raises `UsageError` unless `target` is absent or a safetensors file jaxshrink wrote."""
  fix = "Choose a new output path, or delete it yourself if it is yours to delete."
  if target.is_symlink():
    raise UsageError(f"Refusing to overwrite `{target}`: it is a symlink. {fix}")
  if not target.exists():
    return
  if not target.is_file():
    raise UsageError(
      f"Refusing to overwrite `{target}`: it is a directory holding {_holds(target)}, not a "
      f"safetensors file. {fix}"
    )
  try:
    from safetensors import safe_open

    with safe_open(str(target), framework="numpy") as f:
      ours = layout_key in (f.metadata() or {})
  except Exception:  # safetensors raises its own types for a file that is not one
    ours = False
  if not ours:
    raise UsageError(
      f"Refusing to overwrite `{target}`: it is not a safetensors file written by jaxshrink "
      f"({target.stat().st_size} bytes). {fix}"
    )


def make_staging(staging: Path) -> None:
  """Creates `staging` and marks it as ours before anything else is written into it."""
  staging.mkdir()
  with open(staging / MARKER, "w") as f:
    f.write(MARKER_TEXT)
    f.flush()
    os.fsync(f.fileno())


def _is_ours(path: Path) -> bool:
  if path.is_symlink() or not path.is_dir():
    return False
  marker = path / MARKER
  if marker.is_file() and not marker.is_symlink():
    try:
      if marker.read_text() == MARKER_TEXT:
        return True
    except (OSError, UnicodeDecodeError):
      return False
  return not os.listdir(path) or is_checkpoint_dir(path)


def remove_stale_staging(target: Path) -> list[Path]:
  """Deletes the staging directories a killed save of `target` left; returns them."""
  pattern = _staging_pattern(target)
  removed = []
  try:
    names = os.listdir(target.parent)
  except OSError:
    return removed
  for name in names:
    stale = target.parent / name
    if pattern.fullmatch(name) and _is_ours(stale):
      shutil.rmtree(stale, ignore_errors=True)  # rmtree never follows symlinks inside
      removed.append(stale)
  return removed
