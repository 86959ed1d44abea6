"""Errors a user can fix: they print as a list of problems and exit with code 2, never a traceback.

Runtime failures (a crash inside torch, a full disk) are not UserErrors: they exit 1.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable


@dataclass
class Problem:
    """One thing wrong with the input: where (dotted key, file:row), what, and how to fix it."""

    where: str
    what: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        return f"{text} ({self.hint})" if self.hint else text


class UserError(Exception):
    """A mistake in a recipe, an override, a data file or a command line. Exit code 2."""

    exit_code = 2

    def __init__(self, problems: Problem | str | Iterable[Problem], title: str = "") -> None:
        items: Iterable[Problem | str] = [problems] if isinstance(problems, (Problem, str)) else problems
        self.problems = [p if isinstance(p, Problem) else Problem("", p) for p in items]
        self.title = title
        super().__init__(self.render())

    def render(self) -> str:
        head = self.title or ("error" if len(self.problems) == 1 else f"{len(self.problems)} errors")
        if len(self.problems) == 1 and not self.title:
            return f"error: {self.problems[0]}"
        return head + ":\n" + "\n".join(f"  - {p}" for p in self.problems)


class Preempted(Exception):
    """The run was asked to stop (SIGTERM/SIGUSR1) and stopped at a complete checkpoint: run it again to go on.

    Exit code 75 (EX_TEMPFAIL), which the rendered sbatch script treats as "requeue".
    """

    exit_code = 75


class TrainingStopped(Exception):
    """Training stopped itself because what it was producing cannot be trusted; the last complete checkpoint is kept.

    Each kind has its own exit code and run status (``summary.json``'s ``status``, ``tunelab runs ls``): a
    script, a scheduler or a sweep tells a diverged run from a crash (1), a recipe error (2) or a preemption (75).
    """

    exit_code = 3
    status = "stopped"


class Diverged(TrainingStopped):
    """The training loss left its running band (``train.on_divergence: stop``); ``final/`` is not written."""

    exit_code = 3
    status = "diverged"


class Degraded(TrainingStopped):
    """Training finished, but held-out evaluation after it is far worse than before (``final/`` is written)."""

    exit_code = 5
    status = "degraded"


class NonFinite(TrainingStopped):
    """A loss or gradient became NaN/inf (``train.on_nonfinite: stop``)."""

    exit_code = 4
    status = "nonfinite"


class RecipeError(UserError):
    """Problems found in a recipe before any weights load."""


class DataError(UserError):
    """A data file, row or column is wrong; the message names the file and the row."""


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``word`` (for 'did you mean' hints), or None if nothing is close."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return match[0] if match else None
