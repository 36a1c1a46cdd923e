"""The float model a checkpoint was compressed from, for the commands that compare against it.

A checkpoint is untrusted: a model it names is resolved among zoo names only; code to import
comes from a flag the user types (`--reference-model`).
"""

from __future__ import annotations

from typing import Any


def float_reference(
  manifest: dict[str, Any], model: Any, *, where: str, reference_model: str | None = None
) -> tuple[Any, Any]:
  """`(model, float params)` the checkpoint at `where` was compressed from: `reference_model`
  when given, else the recipe's model when it differs from the checkpoint's (the teacher of a
  distilled student), else `model` itself; params from the recipe's `params` or the zoo."""
  from jaxshrink import recipes
  from jaxshrink.models.registry import checkpoint_model, load_model

  recipe = manifest.get("recipe") or {}
  if reference_model:
    model = load_model(reference_model)
  elif recipe.get("model") is not None and recipe["model"] != manifest["model"]:
    model = checkpoint_model(recipe["model"], field="recipe.model", where=where,
                             flag="--reference-model")  # fmt: skip
  return model, recipes.load_float_params(model, recipe.get("params"), progress=False)
