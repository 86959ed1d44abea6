"""Packed rows (data/collate.py and TRL's padding-free collator) never attend to each other: their logits equal
each row alone."""

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tunelab.models.builtin import builtin_model


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked(name, attn):
    model = builtin_model(name, attn_implementation=attn).eval()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (7, 19, 4, 12)]
    # the collator TRL uses for tunelab's packed, padding-free batches
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collate([{"input_ids": r, "labels": r} for r in rows])
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(map(len, rows)))
    with torch.no_grad():
        # use_cache=False as in training: transformers detects packing from position_ids only without a cache
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for r in rows:
            alone = model(input_ids=torch.tensor([r])).logits[0]
            torch.testing.assert_close(packed[start : start + len(r)], alone, atol=1e-5, rtol=1e-5)
            start += len(r)


def test_packing_without_position_ids_would_leak():
    """Guard that the test above can fail: the same concatenation without position ids mixes rows."""
    model = builtin_model("tiny-llama").eval()
    a, b = list(range(10, 20)), list(range(30, 38))
    with torch.no_grad():
        leaked = model(input_ids=torch.tensor([a + b])).logits[0, len(a) :]
        alone = model(input_ids=torch.tensor([b])).logits[0]
    assert not torch.allclose(leaked, alone, atol=1e-3)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_row_packed_batch_logits_equal_unpacked(name, attn):
    """SDPA/eager batches: several packed rows, right-padded, no attention mask; each example's logits equal it alone."""
    from tunelab.data.collate import PackedRowsCollator

    model = builtin_model(name, attn_implementation=attn).eval()
    g = torch.Generator().manual_seed(3)
    bins = [[7, 19, 4], [12], [5, 9]]  # three packed rows of 30, 12 and 14 tokens
    examples, seqs = [], []
    for lengths in bins:
        row = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
        seqs.append(row)
        flat = [t for r in row for t in r]
        examples.append({"input_ids": flat, "labels": flat, "seq_lengths": lengths})
    batch = PackedRowsCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].shape == (3, 30) and "attention_mask" not in batch
    assert batch["num_real_tokens"] == 56
    # no example's first token is a target (it would be predicted across an example boundary), pads are ignored
    assert batch["labels"][0, [0, 7, 26]].eq(-100).all() and batch["labels"][1, 12:].eq(-100).all()
    assert batch["labels"].ne(-100).sum() == 56 - 6
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for i, row in enumerate(seqs):
            start = 0
            for r in row:
                alone = model(input_ids=torch.tensor([r])).logits[0]
                torch.testing.assert_close(out[i, start : start + len(r)], alone, atol=1e-5, rtol=1e-5)
                start += len(r)
