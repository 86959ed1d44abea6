"""Rewards for online RL (grpo, ppo): built-in functions, user functions, trained reward models.

A recipe lists them under ``method.rewards``, each with a ``weight``; the reward of a completion
is the weighted sum. Each entry is exactly one of:

    - {name: accuracy, column: answer}            # a built-in (rewards/builtin.py)
    - {function: "my_pkg.rewards:brevity"}        # a user function, imported from this path only
    - {model: runs/quickstart-reward/final}       # a reward model trained with method: reward

Every reward function has the signature ``fn(prompts, completions, **columns) -> list[float | None]``
(plain strings; ``columns`` are the dataset's extra columns, one value per completion; None means
"no opinion" and adds nothing). This module imports neither torch nor transformers: the recipe
schema imports it, and ``tunelab validate`` must stay fast.

Parameters a reward does not use default to None rather than to their effective value, so that a
fully dumped spec (the run's ``recipe.lock.yaml``) loads again: ``column: null`` on a ``format``
reward is "not given", while ``column: answer`` would be rejected as not belonging there.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, model_validator

from tunelab.errors import Problem, closest
from tunelab.models.ref import ResolvedModel, resolve_model
from tunelab.rewards.builtin import BUILTIN_REWARDS
from tunelab.specs import Strict

BuiltinName = Literal["accuracy", "numeric", "format", "length", "think_answer"]
FUNCTION_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# the parameters each built-in takes; user functions and reward models take none of these
PARAMS: dict[str, tuple[str, ...]] = {"accuracy": ("column",), "numeric": ("column",), "format": ("pattern",),
                                      "length": ("target",), "think_answer": ()}
BUILTIN_PARAMS = ("column", "pattern", "target")
DEFAULT_COLUMN = "answer"


class RewardSpec(Strict):
    """One reward: a built-in (``name``), a user function (``function``) or a reward model (``model``)."""


    name: BuiltinName | None = Field(None, description="a built-in reward: " + ", ".join(BUILTIN_REWARDS))
    function: str | None = Field(None, description="a user reward function, 'package.module:function'")
    model: str | None = Field(None, description="a reward model: a method: reward run dir (or its final/), "
                                                "a reward LoRA adapter dir, or a hub id")
    weight: float = Field(1.0, allow_inf_nan=False, description="its factor in the total reward")
    column: str | None = Field(None, description=f"accuracy/numeric: the dataset column holding the reference "
                                                 f"(default {DEFAULT_COLUMN})")
    pattern: str | None = Field(None, description="format: the regular expression the whole completion must match")
    target: int | None = Field(None, ge=1, description="length: characters allowed before the penalty starts "
                                                       "(-1 at twice as many)")
    max_length: int = Field(1024, ge=8, description="model: tokens of prompt + completion scored at most "
                                                    "(longer ones are cut at the end and counted)")

    @model_validator(mode="after")
    def _check(self) -> "RewardSpec":
        kinds = [k for k in ("name", "function", "model") if getattr(self, k) is not None]
        if not kinds:
            raise ValueError("a reward needs exactly one of name (a built-in: " + ", ".join(BUILTIN_REWARDS) + "), "
                             "function ('package.module:function') or model (a reward model dir or hub id); "
                             "it has none")
        if len(kinds) > 1:
            raise ValueError(f"a reward needs exactly one of name, function or model, not {' and '.join(kinds)}: "
                             "list them as separate rewards")
        allowed = PARAMS.get(self.name or "", ())
        for param in BUILTIN_PARAMS:
            if getattr(self, param) is not None and param not in allowed:
                owner = (f"the built-in {self.name!r}" if self.name else
                         "a user function (it gets every dataset column as a keyword argument)" if self.function else
                         "a reward model")
                takes = f", which takes {', '.join(allowed)}" if allowed else ""
                raise ValueError(f"{param} does not apply to {owner}{takes}: remove {param}")
        if self.name == "format":
            if self.pattern is None:
                raise ValueError("the format reward needs pattern: a regular expression the whole completion must "
                                 "match, e.g. pattern: '<answer>.*</answer>'")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {exc}") from None
        if self.name == "length" and self.target is None:
            raise ValueError("the length reward needs target: the number of characters allowed before the penalty "
                             "starts, e.g. target: 400")
        if self.function is not None and not FUNCTION_RE.match(self.function):
            raise ValueError(f"function {self.function!r} must be 'package.module:function': an importable module, "
                             "a colon, then the function's name")
        return self

    @property
    def kind(self) -> str:
        """builtin, function or model."""
        return "builtin" if self.name else ("function" if self.function else "model")

    @property
    def label(self) -> str:
        """The name used in logs and metrics: the built-in's name, the function's name, or rm:<run>."""
        if self.name:
            return self.name
        if self.function:
            return self.function.rsplit(":", 1)[1]
        path = Path(str(self.model).rstrip("/\\"))
        # runs/NAME/final: the run's name says more than "final"
        return "rm:" + (path.parent.name if path.name == "final" and path.parent.name else path.name)

    def params(self) -> dict[str, Any]:
        """Keyword arguments of a built-in (with their effective defaults); {} for the other kinds."""
        if self.name in ("accuracy", "numeric"):
            return {"column": self.column or DEFAULT_COLUMN}
        if self.name == "format":
            return {"pattern": self.pattern}
        if self.name == "length":
            return {"target": self.target}
        return {}


def required_columns(specs: list[RewardSpec]) -> set[str]:
    """Dataset columns the built-in rewards read (the reference column of accuracy and numeric)."""
    return {s.params()["column"] for s in specs if s.name in ("accuracy", "numeric")}


def _import_module(name: str) -> Any:
    """Import a user module, also from the current directory.

    ``python -m`` puts the working directory on sys.path but the ``tunelab`` console script does
    not, so ``my_rewards:fn`` next to the recipe would not import. It goes last: a local file never
    shadows an installed package.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    return importlib.import_module(name)


def import_function(path: str) -> Callable[..., Any]:
    """The callable at 'package.module:function': the only way user reward code is imported."""
    module_name, attr = path.split(":", 1)
    fn = getattr(_import_module(module_name), attr)
    if not callable(fn):
        raise TypeError(f"{path} is a {type(fn).__name__}, not a function")
    return fn


def _function_problem(path: str, where: str) -> Problem | None:
    """Why 'package.module:function' cannot be imported, or None."""
    module_name, attr = path.split(":", 1)
    try:
        module = _import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - a user module can fail to import in any way; report, don't crash
        return Problem(where, f"cannot import {module_name} (for {path}): {type(exc).__name__}: {exc}",
                       "is the package importable from the current directory, or installed (pip install -e .)?")
    if not hasattr(module, attr):
        near = closest(attr, [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))])
        return Problem(where, f"{module_name} has no attribute {attr!r} (for {path})",
                       f"did you mean {module_name}:{near}?" if near else
                       f"define {attr}(prompts, completions, **columns) in {getattr(module, '__file__', module_name)}")
    if not callable(getattr(module, attr)):
        return Problem(where, f"{path} is a {type(getattr(module, attr)).__name__}, not a function",
                       "point it at a function fn(prompts, completions, **columns) -> list[float]")
    return None


def _reward_model_problem(model: ResolvedModel) -> Problem | None:
    """Why a model path is not a reward model (sequence classifier or SEQ_CLS adapter), or None (a hub id: not
    checked offline)."""
    hint = "train one with method: reward, or point at its run dir or final/"
    if model.kind == "adapter":
        return None if model.task_type == "SEQ_CLS" else Problem(
            model.key, f"{model.path} is a {model.task_type} adapter, not a reward model", hint)
    if model.kind in ("hf_dir", "mla"):
        if any(a.endswith("ForSequenceClassification") for a in model.architectures):
            return None
        architectures = ", ".join(model.architectures) or "no architectures"
        return Problem(model.key, f"{model.path} is not a reward model ({architectures})", hint)
    if model.kind == "not_a_model" and model.problem is not None:
        return Problem(model.key, model.problem.what, hint)
    if model.kind in ("builtin", "real_builtin", "gguf"):
        return Problem(model.key, f"{model.given} is a causal LM, not a reward model", hint)
    return None


def reward_problems(specs: list[RewardSpec], key: str = "method.rewards",
                    models: dict[str, ResolvedModel] | None = None) -> tuple[list[Problem], list[str]]:
    """Validate-time checks, as (problems, notes): user functions import; local reward model dirs hold one.

    A reward model path that does not exist yet is a note, not a problem: in a chain of recipes
    the reward run is trained before this one, after validation; training stops on it separately.
    """
    problems: list[Problem] = []
    notes: list[str] = []
    for i, spec in enumerate(specs):
        if spec.function:
            problem = _function_problem(spec.function, f"{key}.{i}.function")
        elif spec.model:
            where = f"{key}.{i}.model"
            model = (models or {}).get(where) or resolve_model(spec.model, key=where)  # validate's, when it has it
            if model.missing is not None:
                notes.append(str(model.missing))
                continue
            problem = _reward_model_problem(model)
        else:
            problem = None
        if problem is not None:
            problems.append(problem)
    return problems, notes
