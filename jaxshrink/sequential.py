"""Sequential calibration: compress a model block by block, in the order its forward runs.

A one-pass calibrated method collects every kernel's statistics from the float model at once,
so it holds all of them in memory together (a `K x K` Hessian per kernel for GPTQ and
SparseGPT), and each kernel is fitted to inputs the compressed model will never produce.
Sequentially, the kernels are grouped into blocks (a transformer layer: every kernel under the
first numbered path component, `encoder/layer_3/...`, `block_0/...`; otherwise each kernel is a
block of its own), the blocks are ordered by when the forward first reads them, and each block
is calibrated and compressed on the model whose earlier blocks are already compressed
(`capture.collect` runs the compressed tree). Only one block's statistics are alive at a time.
A kernel stacked over the layers of a `scan` is one block: its layers share one rolled loop.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from jaxshrink.capture import find_sites
from jaxshrink.encoding import materialize
from jaxshrink.tree import paths_rule

_NUMBERED = re.compile(r".*\d$")


def block_of(path: str) -> str:
  """The block a kernel belongs to: its path up to the first numbered component, or itself.

  >>> block_of("encoder/layer_3/attention/query/kernel"), block_of("conv1/kernel")
  ('encoder/layer_3', 'conv1/kernel')
  """
  parts = path.split("/")
  for i, part in enumerate(parts[:-1]):
    if _NUMBERED.fullmatch(part) and i + 1 < len(parts) - 1:
      return "/".join(parts[: i + 1])
  return path


def blocks(
  apply_fn: Callable[..., Any], tree: Any, x: Any, paths: Iterable[str]
) -> list[list[str]]:
  """`paths` grouped into blocks, blocks in the order the forward first reads them.

  Only shapes are traced (`find_sites` on the decoded tree's shapes); kernels the forward
  never reads come last, each alone.
  """
  paths = list(paths)
  shapes = jax.eval_shape(materialize, tree)
  order = list(find_sites(apply_fn, shapes, np.asarray(x), rule=paths_rule(paths), in_order=True))
  order += [p for p in paths if p not in order]
  grouped: dict[str, list[str]] = {}
  for path in order:
    grouped.setdefault(block_of(path), []).append(path)
  return list(grouped.values())
