"""The METHODS registry: recipe ``method.name`` -> the ``Method`` object that trains it (``methods/base.py``).

Adding a method: its module (recipe block + ``Method`` subclass), one line here, its tests and recipes.
"""

from __future__ import annotations

from tunelab.methods.base import Method
from tunelab.methods.dpo import DPO
from tunelab.methods.grpo import GRPO
from tunelab.methods.ppo import PPO
from tunelab.methods.reward import Reward
from tunelab.methods.sft import SFT
from tunelab.specs import MethodBlock

METHODS: dict[str, Method] = {m.name: m for m in (SFT(), Reward(), DPO(), GRPO(), PPO())}


def method_of(block: MethodBlock) -> Method:
    """The method that trains a recipe's ``method:`` block."""
    return METHODS[block.name]
