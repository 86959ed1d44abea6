"""Built-in reward functions: ``fn(prompts, completions, **params_and_columns) -> list[float | None]``.

All are rule-based and deterministic, for verifiable tasks: a reference answer in a dataset
column (``accuracy``, ``numeric``), a required shape (``format``, ``think_answer``), or a
length budget (``length``).
"""

from __future__ import annotations

import math
import re
from typing import Any

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")
THINK_ANSWER_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>(.+?)</answer>\s*$", re.DOTALL)


def normalise(text: str) -> str:
    """Answer text for comparison: inside <answer> if present, lowercased, spaces collapsed, no quotes or end stop."""
    m = ANSWER_RE.search(text)
    if m:
        text = m.group(1)
    text = " ".join(text.strip().lower().split())
    text = text.strip("\"'`").rstrip(".!?").strip()
    return text.strip("\"'`")


def parse_number(text: Any) -> float | None:
    """The answer number: inside <answer> or \\boxed{} if present, else the last number; None if there is none."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text)
    text = str(text)
    for pattern in (ANSWER_RE, BOXED_RE):
        m = pattern.findall(text)
        if m:
            text = m[-1]
            break
    found = NUMBER_RE.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def accuracy(prompts: list[str], completions: list[str], *, column: str = "answer", **columns: Any) -> list[float | None]:
    """1 if the completion equals the reference column after normalisation, else 0 (None: no reference)."""
    refs = columns[column]
    return [None if ref is None else float(normalise(c) == normalise(str(ref))) for c, ref in zip(completions, refs)]


def numeric(prompts: list[str], completions: list[str], *, column: str = "answer", **columns: Any) -> list[float | None]:
    """1 if the completion's answer number equals the reference number (relative/absolute tolerance 1e-6)."""
    out: list[float | None] = []
    for c, ref in zip(completions, columns[column]):
        want = parse_number(ref)
        if want is None:
            out.append(None)
            continue
        got = parse_number(c)
        out.append(float(got is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6)))
    return out


def format(prompts: list[str], completions: list[str], *, pattern: str, **columns: Any) -> list[float | None]:  # noqa: A001
    """1 if the whole (stripped) completion matches ``pattern``, else 0."""
    rx = re.compile(pattern, re.DOTALL)
    return [float(rx.fullmatch(c.strip()) is not None) for c in completions]


def length(prompts: list[str], completions: list[str], *, target: int, **columns: Any) -> list[float | None]:
    """0 up to ``target`` characters, then falling linearly to -1 at twice the target (and staying there)."""
    return [-min(1.0, max(0, len(c) - target) / target) for c in completions]


def think_answer(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
    """1 if the completion is <think>...</think> then a non-empty <answer>...</answer>, else 0."""
    return [float(bool((m := THINK_ANSWER_RE.match(c)) and m.group(1).strip())) for c in completions]


BUILTIN_REWARDS = {"accuracy": accuracy, "numeric": numeric, "format": format, "length": length,
                   "think_answer": think_answer}
