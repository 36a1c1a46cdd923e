"""The on-disk cache shared by datasets and pretrained zoo weights.

Several processes (pytest-xdist workers, parallel CLI runs) may fill the same entry at once, so
every write goes to a private temporary sibling first and is then renamed into place: a reader sees
either no entry or a complete one, never a half-written file.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import uuid

CACHE_ENV_VAR = "JAXSHRINK_CACHE"


def cache_dir() -> pathlib.Path:
  """Returns the cache root, creating it on demand.

  The root is `$JAXSHRINK_CACHE` when that variable is set and non-empty, else
  `~/.cache/jaxshrink`.

  >>> cache_dir().name  # doctest: +SKIP
  'jaxshrink'
  """
  override = os.environ.get(CACHE_ENV_VAR, "")
  default = pathlib.Path.home() / ".cache" / "jaxshrink"
  root = pathlib.Path(override).expanduser() if override else default
  root.mkdir(parents=True, exist_ok=True)
  return root


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> pathlib.Path:
  """Writes `payload` to `path` so that readers never observe a partial file.

  When `path` already exists (another process finished first) the existing file is kept: entries
  are deterministic, so both writers hold the same content.

  Args:
    path: final file location; its parent directory is created if missing.
    payload: the complete file content.

  Returns:
    `path` as a `pathlib.Path`.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.exists():
    return path
  fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as handle:
      handle.write(payload)
      handle.flush()
      os.fsync(handle.fileno())
    if path.exists():
      return path
    os.replace(tmp_name, path)
  finally:
    if os.path.exists(tmp_name):
      os.unlink(tmp_name)
  return path


def temporary_sibling_dir(path: str | os.PathLike) -> pathlib.Path:
  """Creates an empty private directory next to `path`, to be filled then `commit_dir`-ed."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
  tmp.mkdir()
  return tmp


def commit_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> bool:
  """Renames the filled directory `tmp` to `path` atomically.

  Args:
    tmp: a directory made by `temporary_sibling_dir(path)`.
    path: the final directory location.

  Returns:
    True when `tmp` became `path`; False when `path` already existed (another process won the
    race), in which case the existing entry is kept and `tmp` is deleted.
  """
  tmp, path = pathlib.Path(tmp), pathlib.Path(path)
  if not path.exists():
    try:
      # os.rename (not os.replace) so an existing non-empty directory is never clobbered.
      os.rename(tmp, path)
      return True
    except OSError:
      if not path.exists():
        raise
  shutil.rmtree(tmp, ignore_errors=True)
  return False
