"""What ``tunelab plan`` prints (plan/report.py): the table, the histogram and a mask; no config, no estimate."""

from __future__ import annotations

import time
from pathlib import Path

from tunelab.plan import run_plan

REPO = Path(__file__).resolve().parents[3]


def test_plan_cli_shows_table_histogram_and_mask(run_cli):
    t0 = time.perf_counter()
    code, out, err = run_cli("plan", "recipes/quickstart/sft.yaml", "--gpus", "2", "--gpu-memory", "24GB",
                             "--set", "data.max_length=128")
    took = time.perf_counter() - t0
    assert code == 0, err
    assert "zero3+cpu" in out and "cheapest that fits: ddp" in out
    assert "token lengths of builtin:quickstart/sft (1200 rows" in out
    # the pipeline's own count of rows over 128 tokens, dropped under on_overflow: drop
    assert "on_overflow: drop: " in out and " rows dropped" in out
    assert "[[" in out and "<|im_start|>assistant" in out
    assert took < 30


def test_plan_without_a_config_says_so():
    lines = run_plan(str(REPO / "recipes/quickstart/dpo.yaml"), ["model.path=runs/never-trained/final"])
    text = "\n".join(lines)
    assert "memory: not estimated" in text and "runs/never-trained/final" in text
    assert "data: not shown" in text


def test_plan_refuses_what_train_would_refuse(tmp_path):
    """plan runs from the validated recipe: a bad data row is the same exit-2 problem it is for train."""
    import pytest

    from tunelab.errors import RecipeError

    bad = tmp_path / "chat.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')  # ends on a user turn, no reply
    with pytest.raises(RecipeError, match="row 1"):
        run_plan(str(REPO / "recipes/quickstart/sft.yaml"), [f'data.train=[{{source: "{bad}", format: messages}}]'])
