"""The PATCHES registry: recipe ``patches[].name`` -> the pydantic block of that patch.

A patch is a named, parameterised, documented transformation of a config or a loaded model,
applied in recipe order before PEFT. RoPE extension (``rope``) and MLA conversion (``mla``)
register here. This module and the patch blocks import no torch: the recipe schema imports them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tunelab.errors import Problem
from tunelab.patches.mla_patch import MlaPatch
from tunelab.patches.rope import RopePatch

PATCHES: dict[str, type[BaseModel]] = {"rope": RopePatch, "mla": MlaPatch}


def patch_recipe_problems(recipe: Any) -> list[Any]:
    """Checks of the patches that need neither weights nor the model's config (and import no torch)."""
    from tunelab.patches.mla_patch import calibration_problems, mla_recipe_problems, recipe_keys

    problems = []
    converted_by = None  # the mla patch that converts the model, when one does
    for i, spec in enumerate(recipe.patches):
        where = f"patches[{i}]"
        if spec.name == "mla":
            if converted_by is not None:
                problems.append(Problem(where, f"the model is already converted to MLA by {converted_by}",
                                        "keep one mla patch"))
            converted_by = converted_by or where
            problems += mla_recipe_problems(spec, recipe, where)
            problems += calibration_problems(spec, recipe_keys(where))
    return problems


def patch_problems(recipe: Any, config: Any) -> list[Any]:
    """Checks of every patch against the model's config (read without its weights)."""
    from tunelab.patches.mla_patch import mla_config_problems, recipe_keys
    from tunelab.patches.rope import rope_problems

    problems = []
    first_mla = True
    for i, spec in enumerate(recipe.patches):
        where = f"patches[{i}]"
        if spec.name == "rope":
            problems += rope_problems(spec, config, where)
        elif spec.name == "mla" and first_mla:  # a second one is reported by patch_recipe_problems
            problems += mla_config_problems(spec, config, recipe_keys(where))
            first_mla = False
    return problems


def apply_patches(model: Any, recipe: Any, tokenizer: Any = None) -> list[dict[str, Any]]:
    """Apply the recipe's patches to a loaded model in order; one record per patch (for logs and the summary)."""
    from tunelab.patches.mla_patch import apply_mla, recipe_keys
    from tunelab.patches.rope import apply_rope

    records = []
    for i, spec in enumerate(recipe.patches):
        if spec.name == "rope":
            records.append({"name": "rope", **apply_rope(model, spec, tokenizer)})
        elif spec.name == "mla":
            records.append({"name": "mla", **apply_mla(model, spec, tokenizer, recipe_keys(f"patches[{i}]"))})
    return records
