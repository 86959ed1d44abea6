"""The built-in rewards (rewards/builtin.py)."""

from __future__ import annotations

import math

import pytest

from tunelab.rewards.builtin import accuracy, format, length, normalise, numeric, parse_number, think_answer


def test_accuracy_normalises_case_space_quotes_and_final_stop() -> None:
    comps = ["A Frost  bell is WHITE.", "'a frost bell is white'", "<answer> a frost bell is white </answer>",
             "A frost bell is red.", "A frost bell is white. Yes.", "a frost bell is white!?"]
    got = accuracy([""] * 6, comps, column="answer", answer=["A frost bell is white."] * 6)
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert accuracy([""], ["x"], column="ref", ref=[None]) == [None]
    assert normalise('  "Hello   World!" ') == "hello world"
    assert normalise("reasoning <answer>\n'Paris.'\n</answer> more") == "paris"


def test_accuracy_without_its_column_names_the_columns_there() -> None:
    with pytest.raises(KeyError, match="no column 'answer'.*solution"):
        accuracy(["q"], ["a"], column="answer", solution=["a"])


@pytest.mark.parametrize("text,want", [
    ("the total is 1,234 apples", 1234.0), ("1,234, then 5 more: 1,239", 1239.0), ("-3.5", -3.5),
    ("x \\boxed{12} y 99", 12.0), ("<answer>7</answer> then 8", 7.0), ("<answer>it is -2.5 m</answer>", -2.5),
    ("2 plus 3 is 5.", 5.0), ("pages 3-5", 5.0), ("$1,000,000.50", 1000000.5), ("none", None), ("", None),
    (42, 42.0), (2.5, 2.5), ("#### 72", 72.0), (None, None), (True, None),
])
def test_numeric_answer_parsing(text: object, want: float | None) -> None:
    assert parse_number(text) == want


def test_numeric_reward() -> None:
    got = numeric([""] * 6, ["2 plus 3 is 5.", "it is 6", "no idea", "5.0000000001", "\\boxed{5} (not 6)", "5"],
                  column="answer", answer=[5, "5", 5.0, "5", "5", "no number"])
    assert got == [1.0, 0.0, 0.0, 1.0, 1.0, None]


def test_format_length_think_answer() -> None:
    assert format([""] * 4, ["A x is red.", " A x is red. ", "x is red", "A x\ny is red."],
                  pattern=r"A .+ is \w+\.") == [1.0, 1.0, 0.0, 1.0]
    got = length([""] * 5, ["a" * 10, "a" * 15, "a" * 20, "a" * 30, ""], target=10)
    assert got == [0.0, -0.5, -1.0, -1.0, 0.0]
    assert math.copysign(1.0, got[0]) == 1.0  # no -0.0 in the logs
    comps = ["<think>hmm</think> <answer>4</answer>", "\n<think>a\nb</think>\n<answer>4</answer>\n",
             "<answer>4</answer>", "<think>a</think><answer> </answer>", "<think>a</think>\n<answer>4</answer> extra",
             "<think>a</think><answer>4</answer><answer>5</answer>", "<think>a</think>"]
    assert think_answer([""] * 7, comps) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
