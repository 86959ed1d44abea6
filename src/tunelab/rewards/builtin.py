"""Built-in reward functions: ``fn(prompts, completions, **params_and_columns) -> list[float | None]``.

All are rule-based and deterministic, for verifiable tasks: a reference answer in a dataset
column (``accuracy``, ``numeric``), a required shape (``format``, ``think_answer``), or a
length budget (``length``). They import nothing heavy: the recipe schema imports this module.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
# a minus sign only where it cannot be a hyphen or an operator ("3-5" is 3 and 5, not 3 and -5);
# "1,234" with thousands commas, but "1,2345" is two numbers
NUMBER_RE = re.compile(r"(?:(?<![\w.-])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?:(?<![\w.-])-)?\.\d+")
THINK_ANSWER_RE = re.compile(
    r"\s*<think>(?:(?!</?think>).)*</think>\s*<answer>((?:(?!</?answer>).)*)</answer>\s*", re.DOTALL)
QUOTES = "\"'`"


def normalise(text: str) -> str:
    """Answer text for comparison: inside <answer> if present, lowercased, spaces collapsed, no quotes or final stop.

    Exact match on raw text would count "White." and "white" as different answers; anything
    looser (stemming, synonyms) belongs in a user function.
    """
    m = ANSWER_RE.search(text)
    if m:
        text = m.group(1)
    text = " ".join(text.lower().split())
    text = text.strip(QUOTES).rstrip(".!?").strip()
    return text.strip(QUOTES).strip()


def parse_number(text: Any) -> float | None:
    """The answer number: inside <answer> or \\boxed{} if present, else the last number; None if there is none.

    The last number, because reasoning writes its working before its result. References
    (int, float or text such as GSM8K's "#### 1,234") are parsed the same way.
    """
    if isinstance(text, bool) or text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(text) else None
    text = str(text)
    for pattern in (ANSWER_RE, BOXED_RE):
        inside = pattern.findall(text)
        if inside:
            text = inside[-1]
            break
    found = NUMBER_RE.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def _references(columns: dict[str, Any], column: str, n: int) -> list[Any]:
    """The reference column, with a message that names what is there when it is not."""
    if column not in columns:
        raise KeyError(f"no column {column!r} to read references from; the batch has: "
                       f"{', '.join(sorted(columns)) or 'no extra columns'} (set the reward's column:)")
    refs = list(columns[column])
    if len(refs) != n:
        raise ValueError(f"column {column!r} has {len(refs)} values for {n} completions")
    return refs


def accuracy(prompts: list[str], completions: list[str], *, column: str = "answer", **columns: Any) -> list[float | None]:
    """1 if the completion equals the reference column after normalisation, else 0 (None: no reference)."""
    refs = _references(columns, column, len(completions))
    return [None if ref is None else float(normalise(c) == normalise(str(ref))) for c, ref in zip(completions, refs)]


def numeric(prompts: list[str], completions: list[str], *, column: str = "answer", **columns: Any) -> list[float | None]:
    """1 if the completion's answer number equals the reference number (relative/absolute tolerance 1e-6), else 0.

    A completion with no number scores 0; a row whose reference has no number scores None
    (the data, not the policy, is at fault).
    """
    out: list[float | None] = []
    for c, ref in zip(completions, _references(columns, column, len(completions))):
        want = parse_number(ref)
        if want is None:
            out.append(None)
            continue
        got = parse_number(c)
        out.append(float(got is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6)))
    return out


def format(prompts: list[str], completions: list[str], *, pattern: str, **columns: Any) -> list[float | None]:  # noqa: A001
    """1 if the whole (stripped) completion matches ``pattern`` (``.`` matches newlines too), else 0."""
    rx = re.compile(pattern, re.DOTALL)
    return [float(rx.fullmatch(c.strip()) is not None) for c in completions]


def length(prompts: list[str], completions: list[str], *, target: int, **columns: Any) -> list[float | None]:
    """0 up to ``target`` characters, then falling linearly to -1 at twice the target (and staying there).

    A penalty, never a bonus: rewarding short answers would teach the policy to say nothing.
    """
    return [0.0 if len(c) <= target else -min(1.0, (len(c) - target) / target) for c in completions]


def think_answer(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
    """1 if the completion is <think>...</think> then a non-empty <answer>...</answer> and nothing else, else 0.

    Neither block may contain its own tags again, so two answers (one to hedge) do not count.
    """
    out: list[float | None] = []
    for c in completions:
        m = THINK_ANSWER_RE.fullmatch(c)
        out.append(float(m is not None and bool(m.group(1).strip())))
    return out


BUILTIN_REWARDS: dict[str, Callable[..., list[float | None]]] = {
    "accuracy": accuracy, "numeric": numeric, "format": format, "length": length, "think_answer": think_answer}
