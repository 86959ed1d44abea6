"""Packed (padding-free) rows never attend to each other: their logits equal each row alone."""

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
