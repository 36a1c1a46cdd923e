"""The `factorize` recipe stage: SVD low-rank kernels, optional fine-tuning and int factors.

```yaml
- factorize: {target: "dense1/kernel", budget: 0.5, finetune_steps: 300, quantize_factors: 8}
```
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxshrink.compose import decode_selected
from jaxshrink.errors import UsageError
from jaxshrink.lowrank.encoding import quantize_factors
from jaxshrink.lowrank.finetune import finetune
from jaxshrink.lowrank.svd import factorize
from jaxshrink.pipeline import RULE_OPTIONS, Pipeline, register_stage, rule_from_options

FACTORIZE_OPTIONS: dict[str, Any] = {
  **RULE_OPTIONS,
  "target": ".*kernel",
  "min_ndim": 2,
  "rank": None,
  "energy": None,
  "budget": None,
  "finetune_steps": 0,
  "learning_rate": 1e-3,
  "batch_size": None,
  "quantize_factors": None,
}


# What `factorize` cannot follow (`compose`): the orders that work are in the fixes.
REFUSALS = {
  "bitmask": (
    "the SVD factors of a pruned kernel are dense, so its zeros and the bytes they saved are lost",
    "Prune some kernels and factorize others (exclude each stage's kernels from the other's "
    "`target`).",
  ),
  "qarray": (
    "the factors of a quantized kernel would be float again",
    "Factorize first, then quantize: `quantize` (rtn or gptq) quantizes the factors.",
  ),
  "lowrank": ("the kernel is factorized already", "Factorize each kernel once."),
}
REFUSALS["nm"] = REFUSALS["bitmask"]


@register_stage(
  "factorize",
  options=FACTORIZE_OPTIONS,
  doc="Truncated-SVD low-rank factors for selected kernels (one of rank / energy / budget), "
  "optional fine-tuning of the factors, optional int8/int4 factors.",
)
def factorize_stage(pipeline: Pipeline, options: dict[str, Any]) -> Pipeline:
  given = [k for k in ("rank", "energy", "budget") if options[k] is not None]
  if len(given) != 1:
    raise UsageError(
      f"stage `factorize` needs exactly one of `rank`, `energy` or `budget`; got "
      f"{given or 'none'}. E.g. `budget: 0.5` keeps half the selected kernels' params."
    )
  steps = options["finetune_steps"]
  if steps < 0:
    raise UsageError(f"`finetune_steps` of stage `factorize` must be >= 0; got {steps}.")
  bits = options["quantize_factors"]
  if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int)):
    raise UsageError(f"`quantize_factors` must be null or a bit width such as 8; got {bits!r}.")
  rule = rule_from_options(options)
  tree = decode_selected(
    pipeline.tree, rule, stage="factorize", decode=("cast",), refusals=REFUSALS
  )
  tree = factorize(
    tree,
    rule,
    rank=options["rank"],
    energy=options["energy"],
    budget=options["budget"],
  )
  key, sub = jax.random.split(pipeline.key)
  if steps:
    model = pipeline.model
    tree = finetune(
      model.apply,
      tree,
      pipeline.dataset,
      steps=steps,
      learning_rate=options["learning_rate"],
      batch_size=options["batch_size"] or model.batch_size,
      key=sub,
      augment=model.augment,
    )
  if bits is not None:
    tree = quantize_factors(tree, bits)
  return dataclasses.replace(pipeline, tree=tree, key=key)
