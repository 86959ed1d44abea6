"""The patch contract: what shared code (validate, train, the lock file) may ask of a model patch.

A patch is a named, parameterised transformation of a loaded model (and its config), applied in
recipe order before PEFT. Each patch is one module or package in ``tunelab.patches`` with its
recipe block and one ``Patch`` object; ``PATCHES`` (``patches/__init__.py``) maps the recipe's
``patches[].name`` to it. Shared code asks the object and never compares patch names.
"""

from __future__ import annotations

from typing import Any, ClassVar

from tunelab.errors import Problem
from tunelab.specs import PatchBlock


class Patch:
    """One model patch: its recipe block, its checks, how it is applied and the data it reads."""

    name: ClassVar[str]  # the recipe's patches[].name, the PATCHES key
    config: ClassVar[type[PatchBlock]]  # the recipe block
    unique: ClassVar[bool] = False  # at most one per recipe (a model is converted once)

    def check(self, spec: Any, recipe: Any, where: str) -> list[Problem]:
        """Checks against the rest of the recipe that need neither weights nor the model's config (no torch)."""
        return []

    def check_config(self, spec: Any, config: Any, where: str) -> list[Problem]:
        """Checks against the model's config (read without its weights)."""
        return []

    def apply(self, model: Any, spec: Any, tokenizer: Any, where: str) -> dict[str, Any]:
        """Patch a loaded model in place; a record of what was done (printed, and kept in the run summary)."""
        raise NotImplementedError

    def data_sources(self, spec: Any) -> list[str]:
        """Data sources the patch reads (calibration data): fingerprinted in the lock file."""
        return []
