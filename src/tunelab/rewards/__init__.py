"""Rewards for online RL (grpo, ppo): built-in functions, user functions, trained reward models.

A recipe lists them under ``method.rewards``, each with a ``weight``; the reward of a completion
is the weighted sum. Exactly one of:

    - {name: accuracy, column: answer}            # built-in (rewards/builtin.py)
    - {function: "my_pkg.rewards:brevity"}        # a user function, imported from this path only
    - {model: runs/quickstart-reward/final}       # a reward model trained with method: reward

Every reward function has the signature ``fn(prompts, completions, **columns) -> list[float | None]``
(plain strings; ``columns`` are the dataset's extra columns, one value per completion). This
module imports no torch: the recipe schema imports it.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.errors import Problem
from tunelab.rewards.builtin import BUILTIN_REWARDS

BuiltinName = Literal["accuracy", "numeric", "format", "length", "think_answer"]
FUNCTION_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
PARAMS = {"accuracy": {"column"}, "numeric": {"column"}, "format": {"pattern"}, "length": {"target"},
          "think_answer": set()}


class RewardSpec(BaseModel):
    """One reward: a built-in (``name``), a user function (``function``) or a reward model (``model``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: BuiltinName | None = Field(None, description="a built-in reward: " + ", ".join(BUILTIN_REWARDS))
    function: str | None = Field(None, description="a user reward function, 'package.module:function'")
    model: str | None = Field(None, description="a reward model: a method: reward run (or its final/), or hub id")
    weight: float = Field(1.0, description="its share of the total reward")
    column: str | None = Field(None, description="accuracy/numeric: the dataset column with the reference (answer)")
    pattern: str | None = Field(None, description="format: the regular expression the whole completion must match")
    target: int | None = Field(None, ge=1, description="length: characters allowed before the penalty starts")
    max_length: int = Field(1024, ge=8, description="model: tokens of prompt + completion scored at most")

    @model_validator(mode="after")
    def _one_kind(self) -> "RewardSpec":
        kinds = [k for k in ("name", "function", "model") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("a reward needs exactly one of name (built-in), function ('pkg.module:fn') or "
                             f"model (a reward model path); got {', '.join(kinds) or 'none'}")
        given = {k for k in ("column", "pattern", "target") if getattr(self, k) is not None}
        allowed = PARAMS.get(self.name or "", set())
        extra = given - allowed
        if extra:
            owner = f"built-in {self.name!r}" if self.name else ("a user function" if self.function else "a model")
            raise ValueError(f"{sorted(extra)[0]} does not apply to {owner}"
                             + (f" (it takes: {', '.join(sorted(allowed))})" if allowed else ""))
        if self.name == "format":
            if self.pattern is None:
                raise ValueError("format needs pattern: a regular expression the completion must match")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {exc}") from None
        if self.name == "length" and self.target is None:
            raise ValueError("length needs target: the number of characters allowed before the penalty")
        if self.function is not None and not FUNCTION_RE.match(self.function):
            raise ValueError(f"function {self.function!r} must look like 'package.module:function'")
        return self

    @property
    def kind(self) -> str:
        return "builtin" if self.name else ("function" if self.function else "model")

    @property
    def label(self) -> str:
        """The name used in logs and metrics."""
        if self.name:
            return self.name
        if self.function:
            return self.function.rsplit(":", 1)[1]
        return "rm:" + Path(self.model.rstrip("/")).name if Path(self.model.rstrip("/")).name != "final" else \
            "rm:" + Path(self.model.rstrip("/")).parent.name

    def params(self) -> dict[str, Any]:
        """Keyword arguments of a built-in."""
        if self.name in ("accuracy", "numeric"):
            return {"column": self.column or "answer"}
        if self.name == "format":
            return {"pattern": self.pattern}
        if self.name == "length":
            return {"target": self.target}
        return {}


def required_columns(specs: list[RewardSpec]) -> set[str]:
    """Dataset columns the built-in rewards read."""
    return {s.params()["column"] for s in specs if s.name in ("accuracy", "numeric")}


def import_function(path: str) -> Any:
    """The callable at 'package.module:function' (the only way user reward code is imported)."""
    module_name, attr = path.split(":", 1)
    module = importlib.import_module(module_name)
    fn = getattr(module, attr)
    if not callable(fn):
        raise TypeError(f"{path} is a {type(fn).__name__}, not a function")
    return fn


def reward_problems(specs: list[RewardSpec], key: str = "method.rewards") -> tuple[list[Problem], list[str]]:
    """Validate-time checks: user functions import, reward model directories hold a reward model."""
    import json

    problems: list[Problem] = []
    for i, spec in enumerate(specs):
        if spec.function:
            try:
                import_function(spec.function)
            except (ImportError, AttributeError, TypeError) as exc:
                problems.append(Problem(f"{key}.{i}.function", f"{spec.function} does not resolve: "
                                        f"{type(exc).__name__}: {exc}",
                                        "is the package importable from this directory or installed (pip install -e)?"))
        elif spec.model:
            p = Path(spec.model).expanduser()
            if not p.is_dir():
                continue  # a hub id, or a run that does not exist yet (models.load.missing_models notes it)
            for d in (p, p / "final"):
                if (d / "adapter_config.json").is_file():
                    task = json.loads((d / "adapter_config.json").read_text()).get("task_type")
                    if task != "SEQ_CLS":
                        problems.append(Problem(f"{key}.{i}.model", f"{d} is a {task} adapter, not a reward model",
                                                "train one with method: reward"))
                    break
                if (d / "config.json").is_file():
                    arch = json.loads((d / "config.json").read_text()).get("architectures") or []
                    if not any(a.endswith("ForSequenceClassification") for a in arch):
                        problems.append(Problem(f"{key}.{i}.model", f"{d} is not a reward model "
                                                f"({', '.join(arch) or 'no architecture'})",
                                                "train one with method: reward"))
                    break
            else:
                problems.append(Problem(f"{key}.{i}.model", f"{p} holds no model (config.json) or adapter"))
    return problems, []
