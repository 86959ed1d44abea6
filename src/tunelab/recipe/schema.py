"""The recipe schema: the blocks of ``specs`` plus the method and patch unions over the registries.

This module imports no torch, transformers or TRL, so a broken recipe is reported in well
under a second. Method blocks come from the ``METHODS`` registry and patch blocks from
``PATCHES``: both are discriminated unions keyed by the name a recipe uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunelab.data.templates import REGISTRY
from tunelab.errors import closest
from tunelab.methods import METHODS
from tunelab.models.builtin import BUILTIN_MODELS
from tunelab.models.gguf import REAL_BUILTINS
from tunelab.patches import PATCHES
from tunelab.specs import (
    ZERO_STAGES,
    DataSource,
    DataSpec,
    DistributedSpec,
    EvalSpec,
    FSDPSpec,
    LmEvalSpec,
    LoraSpec,
    MethodBlock,
    ModelSpec,
    PatchBlock,
    PeftSpec,
    PrefixSpec,
    PromptSpec,
    QuantizationSpec,
    RecipeSpec,
    Strict,
    TrainSpec,
)

__all__ = ["ZERO_STAGES", "DataSource", "DataSpec", "DistributedSpec", "EvalSpec", "FSDPSpec", "LmEvalSpec",
           "LoraSpec", "MethodSpec", "ModelSpec", "PatchSpec", "PeftSpec", "PrefixSpec", "PromptSpec",
           "QuantizationSpec", "Recipe", "RecipeModelSpec", "RecipeSpec", "Strict", "TrainSpec", "registry_union"]


def registry_union(registry: dict[str, type[BaseModel]], key: str, what: str) -> Any:
    """A discriminated union over a registry's models, or a model that rejects every entry if empty."""
    if registry:
        return Annotated[Union[tuple(registry.values())], Field(discriminator=key)]  # noqa: UP007

    class _NoneRegistered(Strict):
        model_config = ConfigDict(extra="allow")

        @model_validator(mode="before")
        @classmethod
        def _reject(cls, data: Any) -> Any:
            name = data.get(key) if isinstance(data, dict) else data
            raise ValueError(f"unknown {what} {name!r}: no {what}s are available in this version")

    return _NoneRegistered


class RecipeModelSpec(ModelSpec):
    """Which model to load and how.

    ``specs.ModelSpec`` plus the checks of names against the registries (chat templates, built-in models).
    """

    @field_validator("chat_template")
    @classmethod
    def _template_known(cls, v: str) -> str:
        if v == "auto" or v in REGISTRY:
            return v
        if v.endswith(".jinja") or "/" in v:
            if not Path(v).expanduser().is_file():
                raise ValueError(f"chat template file {v} does not exist")
            return v
        guess = closest(v, list(REGISTRY))
        raise ValueError(f"unknown chat template {v!r}" + (f"; did you mean {guess!r}?" if guess else "")
                         + "; known: auto, " + ", ".join(REGISTRY) + ", or a path to a .jinja file")

    @field_validator("path")
    @classmethod
    def _builtin_known(cls, v: str) -> str:
        if v.startswith("builtin:") and v[len("builtin:") :] not in {**BUILTIN_MODELS, **REAL_BUILTINS}:
            known = ", ".join(f"builtin:{k}" for k in {**BUILTIN_MODELS, **REAL_BUILTINS})
            raise ValueError(f"unknown built-in model {v!r}; known: {known}")
        if not v.strip():
            raise ValueError("model path is empty")
        return v


if TYPE_CHECKING:  # what a type checker sees: a block of some method, of some patch
    MethodSpec = MethodBlock
    PatchSpec = PatchBlock
else:  # what pydantic validates: the discriminated unions over the registries
    MethodSpec = registry_union({name: m.config for name, m in METHODS.items()}, "name", "method")
    PatchSpec = registry_union({name: p.config for name, p in PATCHES.items()}, "name", "patch")


class Recipe(RecipeSpec):
    """A whole recipe: model, optional patches and PEFT, data, method, training loop, distribution.

    ``specs.RecipeSpec`` with the method and patch blocks narrowed to the registries' discriminated unions
    (and the model's names checked against the registries): what a YAML recipe is parsed into.
    """

    model: RecipeModelSpec = Field(description="the model to start from and how to load it")
    patches: list[PatchSpec] = Field(
        default_factory=list, description="model patches (rope, mla), applied in order before PEFT")
    method: MethodSpec = Field(description="the training method and its fields (sft, reward, dpo, grpo, ppo)")
