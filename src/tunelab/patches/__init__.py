"""The PATCHES registry: recipe ``patches[].name`` -> the ``Patch`` object (``patches/base.py``).

A patch is a named, parameterised, documented transformation of a config or a loaded model,
applied in recipe order before PEFT. RoPE extension (``rope``) and MLA conversion (``mla``)
register here. This module and the patch blocks import no torch: the recipe schema imports them.
"""

from __future__ import annotations

from typing import Any

from tunelab.errors import Problem
from tunelab.patches.base import Patch
from tunelab.patches.mla import MLA
from tunelab.patches.rope import Rope
from tunelab.specs import RecipeSpec


PATCHES: dict[str, Patch] = {p.name: p for p in (Rope(), MLA())}


def patch_recipe_problems(recipe: "RecipeSpec") -> list[Problem]:
    """Checks of the patches that need neither weights nor the model's config (and import no torch)."""
    problems = []
    first: dict[str, str] = {}  # a unique patch's name -> where it is
    for i, spec in enumerate(recipe.patches):
        where, patch = f"patches[{i}]", PATCHES[spec.name]
        if patch.unique and spec.name in first:
            problems.append(Problem(where, f"the model is already converted to {spec.name.upper()} by "
                                    f"{first[spec.name]}", f"keep one {spec.name} patch"))
            continue
        first.setdefault(spec.name, where)
        problems += patch.check(spec, recipe, where)
    return problems


def patch_problems(recipe: "RecipeSpec", config: Any) -> list[Problem]:
    """Checks of every patch against the model's config (read without its weights)."""
    problems = []
    seen: set[str] = set()
    for i, spec in enumerate(recipe.patches):
        patch = PATCHES[spec.name]
        if patch.unique and spec.name in seen:
            continue  # reported by patch_recipe_problems
        seen.add(spec.name)
        problems += patch.check_config(spec, config, f"patches[{i}]")
    return problems


def apply_patches(model: Any, recipe: "RecipeSpec", tokenizer: Any = None) -> list[dict[str, Any]]:
    """Apply the recipe's patches to a loaded model in order; one record per patch (for logs and the summary)."""
    return [{"name": spec.name, **PATCHES[spec.name].apply(model, spec, tokenizer, f"patches[{i}]")}
            for i, spec in enumerate(recipe.patches)]


def patch_data_sources(recipe: "RecipeSpec") -> list[tuple[str, str]]:
    """(recipe key, data source) of every source the recipe's patches read, for the lock file."""
    return [(f"patches[{i}]", src) for i, spec in enumerate(recipe.patches)
            for src in PATCHES[spec.name].data_sources(spec)]
