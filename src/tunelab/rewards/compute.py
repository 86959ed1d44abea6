"""Reward specs -> callables; scoring a batch; adapters for TRL's GRPOTrainer.

A reward function is user code (or a model) run in the middle of training. When it raises or
returns something unusable, ``RewardError`` names the reward, what went wrong and the first
prompt/completion of the batch, so the fault is found without a debugger. It is a runtime
failure (exit 1), not a ``UserError``: the recipe was valid, the code it points at failed.

A reward model scores the conversation [user: prompt, assistant: completion] rendered with its
own chat template (as ``method: reward`` trained it on prompt + response), at its last token.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from tunelab.errors import UserError
from tunelab.models.inference import load_reward_model, score
from tunelab.rewards import RewardSpec, import_function
from tunelab.rewards.builtin import BUILTIN_REWARDS

# keyword arguments TRL passes to reward functions that are not dataset columns
TRL_ONLY_KWARGS = {"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}
Messages = list[dict[str, Any]]


class RewardError(RuntimeError):
    """A reward function failed or returned the wrong thing; the message names it and the batch."""


def _clip(text: Any, n: int = 200) -> str:
    s = str(text)
    return repr(s if len(s) <= n else s[:n] + "...")


class RewardFunction:
    """One reward of a recipe: ``f(prompts, completions, **columns)`` -> one value (or None) per completion."""

    def __init__(self, spec: RewardSpec, batch_size: int = 16) -> None:
        self.spec = spec
        self.label = spec.label
        self.weight = spec.weight
        self.batch_size = batch_size  # reward model: sequences per forward pass
        self.truncated = 0  # reward model: (prompt, completion) pairs cut to spec.max_length tokens so far
        self._fn: Callable[..., Any] | None = None
        self._model: Any = None
        self._tokenizer: Any = None

    def describe(self) -> str:
        """'reward 'label' (function pkg.mod:fn)': how error messages name it."""
        s = self.spec
        what = f"built-in {s.name}" if s.name else f"function {s.function}" if s.function else f"model {s.model}"
        return f"reward {self.label!r} ({what})"

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        return self.call(prompts, completions, columns)

    def call(self, prompts: list[str], completions: list[str], columns: dict[str, list[Any]],
             conversations: list[Messages] | None = None) -> list[float | None]:
        """The checked values for a batch; ``conversations``: the full prompt messages, for a reward model.

        Columns come as a dict (not keywords) so a dataset column may have any name.
        """
        try:
            if self.spec.model:
                values: Any = self._score_with_model(prompts, completions, conversations)
            else:
                if self._fn is None:
                    s = self.spec
                    self._fn = BUILTIN_REWARDS[s.name] if s.name else import_function(str(s.function))
                values = self._fn(list(prompts), list(completions), **{**columns, **self.spec.params()})
        except (RewardError, UserError):
            raise
        except Exception as exc:
            raise RewardError(
                f"{self.describe()} raised {type(exc).__name__}: {exc} on a batch of {len(completions)} "
                f"(called with prompts, completions and columns: {', '.join(sorted(columns)) or 'none'}); "
                f"first prompt {_clip(prompts[0] if prompts else '')}, completion "
                f"{_clip(completions[0] if completions else '')}") from exc
        return self._checked(values, prompts, completions)

    def _checked(self, values: Any, prompts: list[str], completions: list[str]) -> list[float | None]:
        """``values`` as a list of finite floats and Nones, one per completion, or RewardError."""
        n = len(completions)
        if not isinstance(values, (list, tuple)):
            raise RewardError(f"{self.describe()} returned a {type(values).__name__}; it must return a list of "
                              f"{n} numbers or None, one per completion")
        if len(values) != n:
            raise RewardError(f"{self.describe()} returned {len(values)} values for {n} completions (expected {n}, "
                              f"got {len(values)}); first prompt {_clip(prompts[0] if prompts else '')}")
        out: list[float | None] = []
        for i, v in enumerate(values):
            if v is None:
                out.append(None)
                continue
            try:
                if isinstance(v, (bool, str, bytes)):
                    raise TypeError
                f = float(v)
            except (TypeError, ValueError):
                raise RewardError(f"{self.describe()} returned {v!r} ({type(v).__name__}) at index {i}; rewards "
                                  f"must be numbers or None; completion {_clip(completions[i])}") from None
            if not math.isfinite(f):
                raise RewardError(f"{self.describe()} returned {f} at index {i}; rewards must be finite "
                                  f"(None means no reward for that completion); completion {_clip(completions[i])}")
            out.append(f)
        return out

    # ---- reward models ----------------------------------------------------------------------

    def load(self, device: Any = None) -> "RewardFunction":
        """Load a reward model now (else on first call), frozen in eval mode; move it to ``device`` if given."""
        if self.spec.model and self._model is None:
            model, self._tokenizer = load_reward_model(self.spec.model)
            self._model = model.eval().requires_grad_(False)
        if device is not None and self._model is not None:
            self._model.to(device)
        return self

    def to(self, device: Any) -> "RewardFunction":
        """Move a reward model to ``device`` (loading it now); nothing for functions."""
        return self.load(device)

    def encode(self, prompts: list[str], completions: list[str],
               conversations: list[Messages] | None = None) -> list[list[int]]:
        """Token ids of each [prompt..., assistant: completion] under the reward tokenizer's chat template.

        Over ``max_length`` the end is cut (the prompt is what the completion answers) and counted
        in ``self.truncated``.
        """
        self.load()
        seqs = []
        for j, completion in enumerate(completions):
            prompt = conversations[j] if conversations is not None else [{"role": "user", "content": prompts[j]}]
            conv = [*prompt, {"role": "assistant", "content": completion}]
            out = self._tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True)
            ids = list(out["input_ids"])
            if len(ids) > self.spec.max_length:
                ids = ids[: self.spec.max_length]
                self.truncated += 1
            seqs.append(ids)
        return seqs

    def _score_with_model(self, prompts: list[str], completions: list[str],
                          conversations: list[Messages] | None) -> list[float]:
        """The reward model's score of each (prompt, completion), read at its last real token."""
        seqs = self.encode(prompts, completions, conversations)
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        return score(self._model, seqs, self.batch_size, pad)  # right-padded, under no_grad, on the model's device


def build_rewards(specs: list[RewardSpec]) -> list[RewardFunction]:
    """One RewardFunction per spec (reward models load on first use, or with ``.load(device)``)."""
    return [RewardFunction(s) for s in specs]


def score_all(funcs: list[RewardFunction], prompts: list[str], completions: list[str], columns: dict[str, list],
              conversations: list[Messages] | None = None) -> tuple[list[float], dict[str, list[float | None]]]:
    """(weighted total per completion, raw values per reward label); a None adds nothing (all None: 0.0)."""
    per: dict[str, list[float | None]] = {}
    total = [0.0] * len(completions)
    for f in funcs:
        values = f.call(prompts, completions, columns, conversations)
        per[f.label] = values
        for i, v in enumerate(values):
            if v is not None:
                total[i] += f.weight * v
    return total, per


def _as_text(value: Any, prompt: bool) -> str:
    """A TRL prompt/completion as text: a string as is; messages -> the last user message / all contents."""
    if isinstance(value, str):
        return value
    if prompt:
        users = [m.get("content", "") for m in value if m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return "".join(str(m.get("content", "")) for m in value)


def trl_reward_funcs(funcs: list[RewardFunction]) -> list[Callable[..., list[float | None]]]:
    """Adapters TRL's GRPOTrainer can call: strings in, unweighted values out (TRL applies reward_weights).

    TRL calls ``f(prompts=, completions=, completion_ids=, trainer_state=, **dataset_columns)``;
    conversational prompts are message lists and completions [assistant message]. Each adapter's
    ``__name__`` is the reward's label: TRL names the metric ``rewards/<__name__>``.
    """
    adapters = []
    for f in funcs:
        def adapter(prompts: list[Any], completions: list[Any], _f: RewardFunction = f,
                    **kwargs: Any) -> list[float | None]:
            n = len(completions)
            columns = {k: v for k, v in kwargs.items()
                       if k not in TRL_ONLY_KWARGS and isinstance(v, list) and len(v) == n}
            conversations = list(prompts) if all(isinstance(p, list) for p in prompts) else None
            return _f.call([_as_text(p, True) for p in prompts], [_as_text(c, False) for c in completions],
                           columns, conversations)

        adapter.__name__ = adapter.__qualname__ = f.label
        adapters.append(adapter)
    return adapters
