"""Error types shared by every module; the CLI maps them to exit codes.

Every bad value a user passes raises a `JaxshrinkError` subclass. The ones for a wrong value
or type also subclass `ValueError` / `TypeError`, so `except ValueError` keeps working:

>>> issubclass(InvalidValueError, ValueError) and issubclass(NoMatchError, JaxshrinkError)
True
"""


class JaxshrinkError(Exception):
  """A failure the user can fix: bad value, missing file, corrupt checkpoint.

  The CLI prints the message on one line and exits 1.
  """


class UsageError(JaxshrinkError, ValueError):
  """The command or recipe is malformed (unknown stage, key or option, unsupported field).

  The CLI prints the message on one line and exits 2.
  """


class InvalidValueError(JaxshrinkError, ValueError):
  """An argument has a value jaxshrink cannot use (out of range, wrong shape, bad regex)."""


class InvalidTypeError(JaxshrinkError, TypeError):
  """An argument is the wrong kind of object (a float where a `QuantSpec` belongs, ...)."""


class NoMatchError(JaxshrinkError, ValueError):
  """A rule selected no leaf; the message lists the paths that do exist."""


class CheckpointError(JaxshrinkError):
  """A checkpoint is missing, truncated, corrupted or of an unknown format."""
