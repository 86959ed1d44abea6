"""Held-out perplexity (eval/perplexity.py) by hand; packed equals row by row: no example attends to another, every
scored token is scored once, and the LM-head shortcut (logits only where a label is) changes nothing."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tunelab.eval.perplexity import perplexity
from tunelab.models.builtin import builtin_model


def test_perplexity_matches_hand_computation():
    model = builtin_model("tiny-llama").eval()
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
            {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]}]
    got = perplexity(model, rows, batch_size=2)
    nll, n = 0.0, 0
    with torch.no_grad():
        for r in rows:  # one row at a time, no padding, explicit shift
            logp = torch.log_softmax(model(input_ids=torch.tensor([r["input_ids"]])).logits[0].double(), -1)
            for t in range(1, len(r["input_ids"])):
                if r["labels"][t] != -100:
                    nll -= logp[t - 1, r["labels"][t]].item()
                    n += 1
    assert got["tokens"] == n == 5
    assert math.isclose(got["perplexity"], math.exp(nll / n), rel_tol=1e-5)


def rows_for_test(n: int = 9, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(5, 60)
        ids = [rng.randint(3, 1400) for _ in range(length)]
        start = rng.randint(1, length - 2)
        out.append({"input_ids": ids, "labels": [-100] * start + ids[start:]})
    return out


def independent_nll(model, rows) -> tuple[float, int]:
    """Each row alone, full logits, the usual shift: the reference computation."""
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            logits = model(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1].double()
            target = torch.tensor(r["labels"][1:])
            keep = target != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    return total, count


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_packed_perplexity_equals_row_by_row(name):
    from tunelab.eval.perplexity import perplexity
    from tunelab.models.builtin import builtin_model

    model = builtin_model(name)
    rows = rows_for_test()
    total, count = independent_nll(model, rows)
    want = math.exp(total / count)
    packed = perplexity(model, rows, batch_size=2, pad_id=0, progress=False, pack_tokens=128)
    padded = perplexity(model, rows, batch_size=3, pad_id=0, progress=False)
    assert packed["tokens"] == padded["tokens"] == count
    assert packed["perplexity"] == pytest.approx(want, rel=1e-5)
    assert padded["perplexity"] == pytest.approx(want, rel=1e-5)


def test_packs_fill_rows_without_splitting_one():
    from tunelab.eval.perplexity import packs

    lengths = [50, 10, 70, 30, 90, 5]
    groups = packs(lengths, 100)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 100 for g in groups)
    assert len(groups) == 3  # 255 tokens in rows of 100
