"""Reward specs -> callables; scoring a batch; adapters for TRL's GRPOTrainer.

A reward function is user code (or a model) run in the middle of training: when it raises or
returns something unusable, ``RewardError`` names the reward, what it returned and the first
prompt/completion of the batch, so the fault is found without a debugger.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from tunelab.rewards import RewardSpec, import_function
from tunelab.rewards.builtin import BUILTIN_REWARDS

TRL_ONLY_KWARGS = {"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}


class RewardError(RuntimeError):
    """A reward function failed or returned the wrong thing; the message names it and the batch."""


def _clip(text: Any, n: int = 200) -> str:
    s = str(text)
    return s if len(s) <= n else s[:n] + "..."


class RewardFunction:
    """One reward of a recipe: call it with (prompts, completions, **columns) -> one value per completion."""

    def __init__(self, spec: RewardSpec) -> None:
        self.spec, self.label, self.weight = spec, spec.label, spec.weight
        self.truncated = 0
        self._fn: Callable[..., Any] | None = None
        self._model: Any = None
        self._tokenizer: Any = None

    def describe(self) -> str:
        s = self.spec
        return f"reward {self.label!r} (" + (f"built-in {s.name}" if s.name else
                                              f"function {s.function}" if s.function else f"model {s.model}") + ")"

    def __call__(self, prompts: list[str], completions: list[str], messages: list[Any] | None = None,
                 **columns: Any) -> list[float | None]:
        n = len(completions)
        try:
            if self.spec.model:
                values = self._score_with_model(prompts, completions, messages)
            else:
                if self._fn is None:
                    self._fn = BUILTIN_REWARDS[self.spec.name] if self.spec.name else import_function(self.spec.function)
                kwargs = {**columns, **self.spec.params()} if self.spec.name else columns
                values = self._fn(prompts, completions, **kwargs)
        except RewardError:
            raise
        except Exception as exc:
            raise RewardError(f"{self.describe()} raised {type(exc).__name__}: {exc} on a batch of {n}; first prompt "
                              f"{_clip(prompts[0] if prompts else '')!r}, completion "
                              f"{_clip(completions[0] if completions else '')!r}") from exc
        return self._check(values, prompts, completions)

    def _check(self, values: Any, prompts: list[str], completions: list[str]) -> list[float | None]:
        n = len(completions)
        if not isinstance(values, (list, tuple)):
            raise RewardError(f"{self.describe()} returned a {type(values).__name__}; it must return a list of "
                              f"{n} numbers (one per completion)")
        if len(values) != n:
            raise RewardError(f"{self.describe()} returned {len(values)} values for {n} completions (expected {n}); "
                              f"first prompt {_clip(prompts[0] if prompts else '')!r}")
        out: list[float | None] = []
        for i, v in enumerate(values):
            if v is None:
                out.append(None)
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
                raise RewardError(f"{self.describe()} returned {v!r} at index {i}; rewards must be numbers "
                                  f"(or None); completion {_clip(completions[i])!r}")
            f = float(v)
            if not math.isfinite(f):
                raise RewardError(f"{self.describe()} returned {f} at index {i}; completion {_clip(completions[i])!r}")
            out.append(f)
        return out

    def _score_with_model(self, prompts: list[str], completions: list[str], messages: list[Any] | None) -> list[float]:
        """The reward model's score of each (prompt, completion) rendered as a chat, at its last token."""
        import torch

        from tunelab.data.collate import pad_right

        if self._model is None:
            from tunelab.evaluate import load_reward_model

            self._model, self._tokenizer = load_reward_model(self.spec.model)
            self._model.eval().requires_grad_(False)
        tok, model = self._tokenizer, self._model
        seqs = []
        for j, completion in enumerate(completions):
            prompt = messages[j] if messages is not None else [{"role": "user", "content": prompts[j]}]
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            conv = list(prompt) + [{"role": "assistant", "content": completion}]
            ids = list(tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])
            if len(ids) > self.spec.max_length:
                ids = ids[: self.spec.max_length]
                self.truncated += 1
            seqs.append(ids)
        device = next(model.parameters()).device
        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(seqs), 16):
                ids, mask = pad_right(seqs[start : start + 16], tok.pad_token_id or 0)
                out += model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float().tolist()
        return out

    def to(self, device: Any) -> "RewardFunction":
        """Move a reward model to ``device`` (loads it now)."""
        if self.spec.model:
            if self._model is None:
                self._score_with_model([""], ["x"], None)
            self._model.to(device)
        return self


def build_rewards(specs: list[RewardSpec]) -> list[RewardFunction]:
    return [RewardFunction(s) for s in specs]


def score_all(funcs: list[RewardFunction], prompts: list[str], completions: list[str], columns: dict[str, list],
              messages: list[Any] | None = None) -> tuple[list[float], dict[str, list[float | None]]]:
    """(weighted total per completion, raw values per reward label); None values add nothing."""
    per: dict[str, list[float | None]] = {}
    total = [0.0] * len(completions)
    for f in funcs:
        values = f(prompts, completions, messages=messages, **columns)
        per[f.label] = values
        for i, v in enumerate(values):
            if v is not None:
                total[i] += f.weight * v
    return total, per


def _as_text(value: Any, prompt: bool) -> str:
    if isinstance(value, str):
        return value
    if prompt:
        users = [m.get("content", "") for m in value if m.get("role") == "user"]
        return users[-1] if users else ""
    return "".join(m.get("content", "") for m in value)


def trl_reward_funcs(funcs: list[RewardFunction]) -> list[Callable[..., list[float | None]]]:
    """Adapters TRL's GRPOTrainer can call: strings in, unweighted values out (TRL applies reward_weights)."""
    adapters = []
    for f in funcs:
        def adapter(prompts: list[Any], completions: list[Any], _f: RewardFunction = f, **kwargs: Any) -> list[Any]:
            n = len(completions)
            columns = {k: v for k, v in kwargs.items()
                       if k not in TRL_ONLY_KWARGS and isinstance(v, list) and len(v) == n}
            messages = [p if isinstance(p, list) else None for p in prompts]
            return _f([_as_text(p, True) for p in prompts], [_as_text(c, False) for c in completions],
                      messages=messages if all(m is not None for m in messages) else None, **columns)

        adapter.__name__ = f.label
        adapters.append(adapter)
    return adapters
