"""The built-in recipe stage kinds, each a thin adapter over a public function.

Every technique registers its stage here with its option defaults; the README's
recipe reference documents the same keys. `REQUIRED` marks options without a
default.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Each technique registers its own stage kind on import.
import jaxshrink.distill.stage  # noqa: F401  (distill)
import jaxshrink.lowrank.stage  # noqa: F401  (factorize)
import jaxshrink.quant.stage  # noqa: F401  (quantize)
import jaxshrink.recover.stage  # noqa: F401  (recover)
import jaxshrink.search.stage  # noqa: F401  (search)
import jaxshrink.sparsity.minitron_stage  # noqa: F401  (structured)
import jaxshrink.sparsity.stage  # noqa: F401  (prune)
from jaxshrink.cast import cast_params
from jaxshrink.pipeline import RULE_OPTIONS, Pipeline, register_stage, rule_from_options


@register_stage(
  "cast",
  options={**RULE_OPTIONS, "dtype": "bfloat16"},
  doc="Store selected float leaves as bfloat16 or float16 (2x smaller; computes in float32).",
)
def cast_stage(pipeline: Pipeline, options: dict[str, Any]) -> Pipeline:
  tree = cast_params(pipeline.tree, rule_from_options(options), dtype=options["dtype"])
  return dataclasses.replace(pipeline, tree=tree)
