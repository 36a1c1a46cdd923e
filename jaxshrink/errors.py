"""Error types shared by every module; the CLI maps them to exit codes."""


class JaxshrinkError(Exception):
  """A failure the user can fix: bad value, missing file, corrupt checkpoint.

  The CLI prints the message on one line and exits 1.
  """


class UsageError(JaxshrinkError):
  """The command or recipe is malformed (unknown stage, key or option).

  The CLI prints the message on one line and exits 2.
  """


class NoMatchError(JaxshrinkError, ValueError):
  """A rule selected no leaf; the message lists the paths that do exist."""


class CheckpointError(JaxshrinkError):
  """A checkpoint is missing, truncated, corrupted or of an unknown format."""
