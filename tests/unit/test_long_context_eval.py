"""Long-context evals: passkey prompts and scoring, sliding-window perplexity by hand, the CLI tasks."""

import copy
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from tunelab.errors import UserError
from tunelab.eval import passkey as pk
from tunelab.eval.long_context import ppl_vs_length, text_token_ids
from tunelab.models.builtin import builtin_model, builtin_tokenizer


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


@pytest.fixture(scope="module")
def model():
    return builtin_model("tiny-llama").eval()


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


def _hand_nll(model, ids, length, stride):
    """(sum NLL, count): windows of `length` every `stride` tokens, scoring each window's last `stride` tokens."""
    total, count, start = 0.0, 0, 0
    with torch.no_grad():
        while start + length <= len(ids):
            window = torch.tensor([ids[start : start + length]])
            logp = torch.log_softmax(model(input_ids=window).logits[0].double(), -1)
            for t in range(max(length - stride, 1), length):
                total -= logp[t - 1, ids[start + t]].item()
                count += 1
            start += stride
    return total, count


def test_ppl_vs_length_matches_hand_computation(model):
    ids = torch.randint(3, 1400, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    got = ppl_vs_length(model, ids, [64, 100])
    for r, length in zip(got, [64, 100]):
        # independently: non-overlapping windows, torch cross-entropy over each full window
        total, count = 0.0, 0
        with torch.no_grad():
            for w in range(len(ids) // length):
                window = torch.tensor(ids[w * length : (w + 1) * length])
                logits = model(input_ids=window[None]).logits[0]
                total += F.cross_entropy(logits[:-1].double(), window[1:], reduction="sum").item()
                count += length - 1
        assert r["windows"] == len(ids) // length and r["tokens"] == count
        assert math.isclose(r["ppl"], math.exp(total / count), rel_tol=1e-5)


def test_ppl_vs_length_with_stride_scores_only_the_last_stride_tokens(model):
    ids = torch.randint(3, 1400, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    (r,) = ppl_vs_length(model, ids, [64], stride=16)
    windows = (200 - 64) // 16 + 1
    assert r["windows"] == windows and r["tokens"] == windows * 16 and r["stride"] == 16
    total, count = _hand_nll(model, ids, 64, 16)
    assert count == r["tokens"]
    assert math.isclose(r["nll"], total / count, rel_tol=1e-5)


def test_ppl_vs_length_text_shorter_than_length_is_an_error(model):
    with pytest.raises(UserError) as exc:
        ppl_vs_length(model, list(range(3, 53)), [32, 64], label="--data tiny.jsonl")
    msg = str(exc.value)
    assert "--data tiny.jsonl" in msg and "50 tokens" in msg and "64" in msg


def test_text_token_ids_joins_documents_with_eos(tok):
    ids = text_token_ids("builtin:quickstart/text", tok, "text", max_tokens=120)
    assert len(ids) == 120
    from tunelab.data.sources import BUILTIN_DATA

    rows = [json.loads(line)["text"] for line in (BUILTIN_DATA / "quickstart/text.jsonl").read_text().splitlines()[:5]]
    expected = []
    for text in rows:
        expected += ([tok.eos_token_id] if expected else []) + tok(text, add_special_tokens=False)["input_ids"]
    assert ids == expected[:120]


def test_cli_passkey(run_cli, tmp_path):
    rc, out, err = run_cli("eval", "builtin:tiny-llama", "--task", "passkey", "--lengths", "128,256", "--depths",
                           "0,1", "--trials", "2", "--output", tmp_path)
    assert rc == 0, err
    grid = json.loads((tmp_path / "passkey.json").read_text())
    assert grid["lengths"] == [128, 256] and grid["depths"] == [0.0, 1.0] and len(grid["cases"]) == 8
    assert len(grid["accuracy"]) == 2 and all(len(row) == 2 for row in grid["accuracy"])
    assert (tmp_path / "passkey.png").stat().st_size > 1000
    assert "mean accuracy" in out and "d=0.5" not in out and "d=1" in out


def test_cli_ppl_vs_length(run_cli, tmp_path):
    rc, out, err = run_cli("eval", "builtin:tiny-llama", "--task", "ppl-vs-length", "--data", "builtin:quickstart/text",
                           "--format", "text", "--lengths", "64,128", "--max-tokens", "1500", "--output", tmp_path)
    assert rc == 0, err
    report = json.loads((tmp_path / "ppl_vs_length.json").read_text())
    assert [r["length"] for r in report["results"]] == [64, 128]
    assert all(r["ppl"] > 1 and r["tokens"] > 0 for r in report["results"])
    assert (tmp_path / "ppl_vs_length.png").stat().st_size > 1000


def test_cli_long_context_user_errors(run_cli, tmp_path):
    rc, _, err = run_cli("eval", "builtin:tiny-llama", "--task", "ppl-vs-length", "--lengths", "64")
    assert rc == 2 and "--data" in err and "Traceback" not in err
    rc, _, err = run_cli("eval", "builtin:tiny-llama", "--task", "passkey", "--depths", "0,1.5")
    assert rc == 2 and "--depths" in err
    rc, _, err = run_cli("eval", "builtin:tiny-llama", "--task", "passkey", "--lengths", "16,256", "-o", tmp_path)
    assert rc == 2 and "--lengths" in err and "minimum" in err and not (tmp_path / "passkey.json").exists()
    rc, _, err = run_cli("eval", "builtin:tiny-llama", "--task", "ppl-vs-length", "--data", "builtin:quickstart/text",
                         "--lengths", "64,512", "--max-tokens", "300")
    assert rc == 2 and "--max-tokens 300" in err and "512" in err


def _first_n_ppl(model, docs, n):
    """Independently: a forward pass over each document's first n tokens alone (a fresh copy of the model
    for each, so no state is left from another pass), full logits."""
    import copy

    total = 0.0
    with torch.no_grad():
        for doc in docs:
            window = torch.tensor(doc[:n])
            logits = copy.deepcopy(model)(input_ids=window[None]).logits[0]
            total += F.cross_entropy(logits[:-1].double(), window[1:], reduction="sum").item()
    return math.exp(total / (len(docs) * (n - 1)))


@pytest.mark.parametrize("method", [None, "yarn", "dynamic_ntk"])
def test_prefix_ppl_equals_a_pass_over_each_prefix(method):
    from tunelab.eval.long_context import prefix_ppl
    from tunelab.patches.rope import RopePatch, apply_rope

    model = builtin_model("tiny-llama").eval()
    if method:
        apply_rope(model, RopePatch(name="rope", method=method, factor=2, original_max_position_embeddings=32))
    gen = torch.Generator().manual_seed(2)
    docs = [torch.randint(3, 1400, (n,), generator=gen).tolist() for n in (96, 120)]
    lengths = [32, 48, 96]  # 32 = the original length: after a 96-token pass, dynamic NTK must reset for it
    pristine = copy.deepcopy(model)
    got = prefix_ppl(model, docs, lengths)
    for r, n in zip(got["results"], lengths):
        assert r["tokens"] == 2 * (n - 1) and r["documents"] == 2
        assert math.isclose(r["ppl"], _first_n_ppl(pristine, docs, n), rel_tol=1e-5), (method, n)
    assert len(got["nll_by_position"]) == 95


def test_prefix_ppl_dynamic_ntk_differs_from_the_long_pass_prefix():
    # the reason dynamic NTK gets one pass per length: within its 32 positions, the 16-token pass is
    # unscaled while the first 16 positions of the 96-token pass are scaled
    from tunelab.patches.rope import RopePatch, apply_rope

    model = builtin_model("tiny-llama").eval()
    apply_rope(model, RopePatch(name="rope", method="dynamic_ntk", factor=2, original_max_position_embeddings=32))
    doc = torch.randint(3, 1400, (1, 96), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        short = model(input_ids=doc[:, :16]).logits[0]
        long = model(input_ids=doc).logits[0, :16]
        again = model(input_ids=doc[:, :16]).logits[0]
    assert (short - long).abs().max() > 1e-4
    assert torch.allclose(short, again)


def test_prefix_ppl_refuses_short_documents(model):
    from tunelab.eval.long_context import prefix_ppl

    with pytest.raises(UserError) as exc:
        prefix_ppl(model, [list(range(3, 200)), list(range(3, 50))], [64, 128])
    assert "1 of 2 documents" in str(exc.value) and "128" in str(exc.value)
