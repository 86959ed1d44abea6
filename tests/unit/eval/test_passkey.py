"""Passkey retrieval (eval/passkey.py): prompts that fill the length with the key at the asked depth, scoring."""

import re

import pytest

from tunelab.errors import UserError
from tunelab.eval import passkey as pk


def _filler_fraction(text: str, key: int) -> float:
    """Share of the filler characters that come before the passkey sentence."""
    start = text.index(pk.needle(key))
    end = start + len(pk.needle(key))
    before = start - len(pk.TASK_DESCRIPTION) - 1  # minus the newline after the description
    after = len(text) - end - len(pk.QUESTION) - 1
    return before / (before + after)


@pytest.mark.parametrize("length", [128, 300, 1000, 1500])
def test_passkey_prompt_fills_length_without_going_over(tok, length):
    text, ids = pk.passkey_prompt(tok, length, 0.5, 12345)
    assert ids == tok(text)["input_ids"]
    assert length - 12 <= len(ids) <= length  # whole filler sentences: at most one sentence short
    assert text.startswith(pk.TASK_DESCRIPTION) and text.endswith("\n" + pk.QUESTION)
    assert text.count("12345") == 2 and text.count(pk.needle(12345)) == 1


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_sits_at_the_requested_depth(tok, depth):
    key = 54321
    text, ids = pk.passkey_prompt(tok, 600, depth, key)
    frac = _filler_fraction(text, key)
    if depth == 0.0:
        assert frac == 0.0 and text.startswith(pk.TASK_DESCRIPTION + "\n" + pk.needle(key) + "\n")
    elif depth == 1.0:
        assert frac == 1.0 and text.endswith(pk.needle(key) + "\n" + pk.QUESTION)
    else:
        assert abs(frac - depth) < 0.02
    # the same position measured in tokens
    prefix = len(tok(text[: text.index(pk.needle(key))])["input_ids"])
    head, tail = len(tok(pk.TASK_DESCRIPTION + "\n")["input_ids"]), len(tok("\n" + pk.QUESTION)["input_ids"])
    span = len(ids) - head - tail - len(tok(pk.needle(key) + "\n")["input_ids"])
    assert abs((prefix - head) / span - depth) < 0.04


def test_passkey_length_too_short_names_the_minimum(tok):
    minimum = pk.passkey_min_length(tok)
    text, ids = pk.passkey_prompt(tok, minimum, 0.5, 12345)  # no filler at all, still a valid prompt
    assert len(ids) <= minimum and "The grass" not in text
    with pytest.raises(UserError) as exc:
        pk.passkey_prompt(tok, len(ids) - 1, 0.5, 12345)
    assert "--lengths" in str(exc.value) and f"minimum for this tokenizer is {len(ids)} tokens" in str(exc.value)


def test_passkey_found():
    assert pk.passkey_found(" 12345. Remember it.", 12345)
    assert pk.passkey_found("is 12345", 12345)
    assert not pk.passkey_found(" 123456", 12345)
    assert not pk.passkey_found(" 1234", 12345)
    assert not pk.passkey_found(" the grass is green", 12345)


def _stub(tok, calls, offset):
    """A 'model' that reads the passkey from the prompt and answers it (+ offset)."""

    def fake_generate(model, input_ids, max_new_tokens, pad_token_id):
        prompt = tok.decode(input_ids)
        calls.append(len(input_ids))
        key = int(re.search(r"The pass key is (\d+)\.", prompt).group(1))
        return tok(f" {key + offset}.", add_special_tokens=False)["input_ids"]

    return fake_generate


@pytest.mark.parametrize("offset,expected", [(0, 1.0), (1, 0.0)])
def test_passkey_grid_scores_the_answers(tok, model, monkeypatch, offset, expected):
    calls = []
    monkeypatch.setattr(pk, "greedy_continue", _stub(tok, calls, offset))
    grid = pk.passkey_grid(model, tok, [128, 256], [0.0, 0.5, 1.0], trials=3, seed=7)
    assert len(calls) == 2 * 3 * 3 and max(calls[:9]) <= 128 and max(calls[9:]) <= 256
    assert grid["accuracy"] == [[expected] * 3] * 2
    assert grid["mean_by_length"] == [expected] * 2 and grid["mean"] == expected
    assert all(c["correct"] == (offset == 0) for c in grid["cases"])
    again = pk.passkey_grid(model, tok, [128, 256], [0.0, 0.5, 1.0], trials=3, seed=7)
    assert [c["passkey"] for c in again["cases"]] == [c["passkey"] for c in grid["cases"]]  # seeded
