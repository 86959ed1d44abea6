"""The METHODS registry: recipe ``method.name`` -> the pydantic block of that method.

Each method lives in one module that holds its recipe block (a pydantic model, imported here,
so it must not import torch at module level) and its ``build_trainer`` / ``trl_config``
functions (heavy imports inside), ``ACCEPTED_FORMATS``, ``MODEL_HEAD`` (causal | score) and
``evaluate`` / ``report`` for the held-out numbers printed after training, and optionally
``check_recipe(recipe) -> list[Problem]`` for checks beyond the schema. A method without a TRL
trainer (ppo) has no ``trl_config``.
``method_module(spec)`` finds the module of a block.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from pydantic import BaseModel

from tunelab.methods.dpo import DPOMethod
from tunelab.methods.grpo import GRPOMethod
from tunelab.methods.ppo import PPOMethod
from tunelab.methods.reward import RewardMethod
from tunelab.methods.sft import SFTMethod

METHODS: dict[str, type[BaseModel]] = {"sft": SFTMethod, "reward": RewardMethod, "dpo": DPOMethod,
                                       "grpo": GRPOMethod, "ppo": PPOMethod}


def method_module(spec: BaseModel) -> ModuleType:
    """The module that trains a method block (``build_trainer``, ``trl_config``)."""
    return importlib.import_module(type(spec).__module__)
