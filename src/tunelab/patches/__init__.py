"""The PATCHES registry: recipe ``patches[].name`` -> the pydantic block of that patch.

A patch is a named, parameterised, documented transformation of a config or a loaded model,
applied in recipe order before PEFT. RoPE extension and MLA conversion register here. This
module and the patch blocks import no torch: the recipe schema imports them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tunelab.patches.rope import RopePatch

PATCHES: dict[str, type[BaseModel]] = {"rope": RopePatch}


def patch_problems(recipe: Any, config: Any) -> list[Any]:
    """Validate-time checks of every patch against the model's config (no weights loaded)."""
    from tunelab.patches.rope import rope_problems

    problems = []
    for i, spec in enumerate(recipe.patches):
        if spec.name == "rope":
            problems += rope_problems(spec, config, f"patches[{i}]")
    return problems


def apply_patches(model: Any, recipe: Any, tokenizer: Any = None) -> list[dict[str, Any]]:
    """Apply the recipe's patches to a loaded model in order; one record per patch (for logs and the summary)."""
    from tunelab.patches.rope import apply_rope

    records = []
    for spec in recipe.patches:
        if spec.name == "rope":
            records.append({"name": "rope", **apply_rope(model, spec, tokenizer)})
    return records
