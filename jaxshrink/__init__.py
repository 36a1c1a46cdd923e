"""jaxshrink: make trained JAX/Flax networks smaller and cheaper to run."""

__version__ = "0.1.0"

from jaxshrink.cast import Cast as Cast
from jaxshrink.cast import cast_params as cast_params
from jaxshrink.encoding import Encoding as Encoding
from jaxshrink.encoding import materialize as materialize
from jaxshrink.encoding import register_encoding as register_encoding
from jaxshrink.errors import CheckpointError as CheckpointError
from jaxshrink.errors import JaxshrinkError as JaxshrinkError
from jaxshrink.errors import NoMatchError as NoMatchError
from jaxshrink.errors import UsageError as UsageError
from jaxshrink.export import load as load
from jaxshrink.export import read_manifest as read_manifest
from jaxshrink.export import save as save
from jaxshrink.report import tree_report as tree_report
from jaxshrink.tree import Rule as Rule
from jaxshrink.tree import flatten as flatten
from jaxshrink.tree import map_selected as map_selected
from jaxshrink.tree import select as select

__all__ = [
  "Cast",
  "CheckpointError",
  "Encoding",
  "JaxshrinkError",
  "NoMatchError",
  "Rule",
  "UsageError",
  "cast_params",
  "flatten",
  "load",
  "map_selected",
  "materialize",
  "read_manifest",
  "register_encoding",
  "save",
  "select",
  "tree_report",
]
