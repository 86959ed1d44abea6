"""Fixtures shared by the rewards/ tests."""

from __future__ import annotations

import textwrap

import pytest


@pytest.fixture
def user_package(tmp_path, monkeypatch) -> str:
    pkg = tmp_path / "myrewards"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "fns.py").write_text(textwrap.dedent("""
        def short(prompts, completions, **kw):
            return [1.0 if len(c) < 5 else 0.0 for c in completions]
        def boom(prompts, completions, **kw):
            raise ValueError("no reference for this task")
        def too_few(prompts, completions, **kw):
            return [1.0]
        def words(prompts, completions, **kw):
            return ["good" for _ in completions]
        def not_a_list(prompts, completions, **kw):
            return 1.0
        def nan_second(prompts, completions, **kw):
            return [0.5, float("nan")]
        def uses_column(prompts, completions, task, **kw):
            return [float(t == "colour") for t in task]
        NOT_CALLABLE = 3
    """))
    (pkg / "broken.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "myrewards.fns"
