"""The MLA patch: convert MHA/GQA attention into multi-head latent attention (DeepSeek-style).

``block`` (the recipe block and its checks, no torch), ``calibration`` (the tokens it calibrates
on), ``convert`` (the conversion and loading a converted model), ``attention`` (the MLA attention
module and its cache), ``export`` (to DeepSeek's own MLA layout).
"""

from __future__ import annotations

from typing import Any

from tunelab.errors import Problem
from tunelab.patches.base import Patch
from tunelab.patches.mla.block import MlaPatch, mla_config_problems, mla_recipe_problems, recipe_keys
from tunelab.patches.mla.calibration import calibration_problems


class MLA(Patch):
    """Convert every attention layer to MLA (``tunelab.patches.mla.convert``)."""

    name = "mla"
    config = MlaPatch
    unique = True

    def check(self, spec: Any, recipe: Any, where: str) -> list[Problem]:
        return mla_recipe_problems(spec, recipe, where) + calibration_problems(spec, recipe_keys(where))

    def check_config(self, spec: Any, config: Any, where: str) -> list[Problem]:
        return mla_config_problems(spec, config, recipe_keys(where))

    def apply(self, model: Any, spec: Any, tokenizer: Any, where: str) -> dict[str, Any]:
        from tunelab.patches.mla.convert import apply_mla  # torch

        return apply_mla(model, spec, tokenizer, recipe_keys(where))

    def data_sources(self, spec: Any) -> list[str]:
        return [spec.calibration_data] if spec.calibration_data else []
