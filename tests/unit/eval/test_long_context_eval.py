"""Long-context perplexity (eval/long_context.py): sliding windows and prefixes by hand, text joined with eos."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tunelab.errors import UserError
from tunelab.eval.long_context import ppl_vs_length, text_token_ids
from tunelab.models.builtin import builtin_model


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
