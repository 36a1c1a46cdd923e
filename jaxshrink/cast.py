"""Half-precision storage: keep float leaves as bfloat16 or float16.

The simplest compression, and the float baseline every other technique is
compared against: 2x smaller, and the model still computes in float32 because
`materialize` casts back inside `jit`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.encoding import Encoding, register_encoding
from jaxshrink.errors import InvalidTypeError, InvalidValueError
from jaxshrink.model import accepts_models
from jaxshrink.tree import Rule, map_selected


@register_encoding
class Cast(Encoding):
  """Dense storage in a narrower float dtype (bfloat16 or float16).

  Halves a float32 leaf. `materialize` casts back to the logical dtype, so the
  model computes in its own precision.

  Attributes:
    values: the array in the storage dtype, logical shape.
    shape: logical shape.
    dtype: logical dtype name (e.g. `float32`).
  """

  name: ClassVar[str] = "cast"
  array_fields: ClassVar[tuple[str, ...]] = ("values",)
  values: jax.Array
  shape: tuple[int, ...]
  dtype: str

  STORAGE_DTYPES: ClassVar[tuple[str, ...]] = ("bfloat16", "float16")

  @classmethod
  def encode(cls, x: jax.Array, storage_dtype: str, *, path: str = "<array>") -> Cast:
    if storage_dtype not in cls.STORAGE_DTYPES:
      raise InvalidValueError(
        f"cast `dtype` must be one of {list(cls.STORAGE_DTYPES)}; got {storage_dtype!r} "
        f"for `{path}`."
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise InvalidTypeError(
        f"cast needs a float array at `{path}`; got dtype {x.dtype}. Exclude integer "
        "leaves from the rule's `target`."
      )
    values = jnp.asarray(x).astype(storage_dtype)
    return cls(values=values, shape=tuple(x.shape), dtype=np.dtype(x.dtype).name)

  def materialize(self) -> jax.Array:
    return self.values.astype(self.dtype)

  def describe(self) -> str:
    return f"{np.dtype(self.values.dtype).name} storage"


# Casting halves biases and norm scales too, so the default selects leaves of every rank.
EVERY_LEAF = Rule(min_ndim=0)


@accepts_models
def cast_params(tree: Any, rule: Rule | str = EVERY_LEAF, *, dtype: str = "bfloat16") -> Any:
  """Stores every float leaf selected by `rule` as a `Cast` encoding.

  Leaves another technique already encoded are left as they are, so `cast`
  can run last to halve whatever stayed in float32. `tree` may be a model
  (`jaxshrink.model`); the result then comes back in its form.

  >>> ctree = cast_params(params, Rule(include=".*kernel"), dtype="bfloat16")
  """

  def encode(path: str, leaf: Any) -> Any:
    if isinstance(leaf, Encoding):
      return leaf
    return Cast.encode(leaf, dtype, path=path)

  return map_selected(encode, tree, rule)
