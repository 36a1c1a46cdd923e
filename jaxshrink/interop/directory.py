"""Writing a Hugging Face model directory all at once, and replacing only one jaxshrink wrote.

An export is written into a staging directory beside the target (marked as ours before anything
else goes in, so a killed export's leftovers are recognised and removed by the next one) and
renamed into place when complete: a reader never sees half a model. `overwrite` replaces only a
directory that holds nothing but the files an export writes and whose `config.json` carries the
`jaxshrink` entry an export adds, or an empty directory; anything else is refused untouched.

>>> with hf_directory(Path("out/llama-hf"), overwrite=False) as staging:  # doctest: +SKIP
...   (staging / "config.json").write_text("{}")
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from jaxshrink.errors import UsageError
from jaxshrink.export.overwrite import MARKER, make_staging, remove_stale_staging, staging_name

EXPORT_KEY = "jaxshrink"  # the config.json entry that marks a directory an export wrote
EXPORT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "README.md"}  # fmt: skip
_CONFIG_PEEK = 1 << 20  # a config.json is a few kB; a larger one is not ours


def is_export_dir(path: Path) -> bool:
  """A real directory holding only export files, with a `config.json` an export wrote."""
  config = path / "config.json"
  if path.is_symlink() or not path.is_dir() or config.is_symlink() or not config.is_file():
    return False
  if not set(os.listdir(path)) <= EXPORT_FILES:
    return False
  try:
    if config.stat().st_size > _CONFIG_PEEK:
      return False
    head = json.loads(config.read_bytes())
  except (OSError, ValueError, RecursionError):
    return False
  return isinstance(head, dict) and isinstance(head.get(EXPORT_KEY), dict)


def check_export_target(target: Path, *, overwrite: bool) -> None:
  """Raises `UsageError` unless `target` may be written: absent, empty, or (with `overwrite`)
  a directory an earlier export wrote."""
  fix = "Choose a new output path, or delete it yourself if it is yours to delete."
  if target.is_symlink():
    raise UsageError(f"Refusing to write `{target}`: it is a symlink. {fix}")
  if not target.exists() or (target.is_dir() and not os.listdir(target)):
    return
  if not overwrite:
    raise UsageError(f"`{target}` already exists; pass --overwrite to replace an earlier export.")
  if not is_export_dir(target):
    held = sorted(os.listdir(target))[:5] if target.is_dir() else []
    kind = f"a directory holding {held}" if target.is_dir() else "a file"
    raise UsageError(
      f"Refusing to overwrite `{target}`: it is {kind}, not a model directory that "
      f"`jaxshrink export` wrote. {fix}"
    )


@contextlib.contextmanager
def hf_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
  """Yields a staging directory that becomes `target` when the block completes.

  Raises:
    UsageError: `target` exists and may not be replaced (see `check_export_target`); checked
      before the block runs, so no work is lost to it.
  """
  target = Path(target).absolute()
  check_export_target(target, overwrite=overwrite)
  target.parent.mkdir(parents=True, exist_ok=True)
  remove_stale_staging(target)
  staging = target.parent / staging_name(target, uuid.uuid4().hex[:8])
  make_staging(staging)
  try:
    yield staging
    (staging / MARKER).unlink()
    # safetensors creates its file owner-only; a model directory is for servers to read.
    umask = os.umask(0)
    os.umask(umask)
    for entry in staging.iterdir():
      entry.chmod(0o666 & ~umask)
    check_export_target(target, overwrite=overwrite)  # unchanged while the block ran
    retired = None
    if target.exists():
      retired = target.parent / staging_name(target, uuid.uuid4().hex[:8])
      os.rename(target, retired)
    os.rename(staging, target)
    if retired is not None:
      shutil.rmtree(retired, ignore_errors=True)
  finally:
    if staging.exists():
      shutil.rmtree(staging, ignore_errors=True)
