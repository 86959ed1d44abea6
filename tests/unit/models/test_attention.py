"""Packed-row attention (``tunelab.models.attention.packed_sdpa``) against transformers' SDPA with the
block-diagonal mask it builds from packed position ids: same outputs and gradients, less score work."""

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.collate import PackedRowsCollator
from tunelab.models import attention
from tunelab.models.builtin import builtin_model


def _packed_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in ([7, 1, 12, 5, 9], [20, 3, 6], [2, 2, 2, 2]):  # one-token examples too; rows of unequal width
        ids = torch.randint(3, 1400, (sum(lengths),), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "seq_lengths": lengths})
    batch = PackedRowsCollator(pad_token_id=0)(rows)  # right-pads the shorter rows (position 0 each)
    batch.pop("num_real_tokens")
    return batch


def _model(impl: str):
    torch.manual_seed(0)
    model = builtin_model("tiny-llama")
    if impl == attention.NAME:
        assert attention.use_packed_sdpa(model)
    return model


def _forward_backward(model, batch):
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    out.logits.pow(2).mean().backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_sdpa_equals_sdpa_with_the_block_diagonal_mask():
    batch = _packed_batch()
    ref_logits, ref_grads = _forward_backward(_model("sdpa"), batch)
    model = _model(attention.NAME)
    assert model.config._attn_implementation == attention.NAME
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA is covered
    logits, grads = _forward_backward(model, batch)
    real = batch["input_ids"] != 0
    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-5, rtol=1e-5)
    assert ref_grads.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_each_example_is_attended_at_its_own_size(monkeypatch):
    """The headline: no score matrix spans a whole row; every SDPA call is causal over examples of similar size."""
    batch = _packed_batch()
    widths = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        widths.append((q.shape[2], kwargs.get("is_causal"), kwargs.get("attn_mask")))
        return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = _model(attention.NAME)
    with torch.no_grad():
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    layers = model.config.num_hidden_layers
    assert widths and len(widths) % layers == 0
    assert all(causal is True and mask is None for _, causal, mask in widths)
    assert max(w for w, _, _ in widths) == 20 < batch["input_ids"].shape[1] == 34
    # examples of 2..20 tokens (2, 2, 2, 2, 3, 5, 6, 7, 9, 12, 20) in batches padded to at most 1.25x their
    # shortest member; the 1-token example is its own value, with no call
    assert sorted({w for w, _, _ in widths}) == [2, 3, 6, 7, 9, 12, 20]


def test_unpacked_rows_and_decoding_fall_back_to_sdpa():
    torch.manual_seed(1)
    ids = torch.randint(3, 1400, (2, 10))
    ref, ours = _model("sdpa"), _model(attention.NAME)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # left padding
        a = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        b = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_only_sdpa_models_are_switched(impl):
    model = builtin_model("tiny-llama")
    model.set_attn_implementation(impl)
    assert attention.use_packed_sdpa(model) is (impl == "sdpa")
    assert model.config._attn_implementation == (attention.NAME if impl == "sdpa" else "eager")


def test_a_new_batch_in_recycled_memory_gets_its_own_plan():
    """A new batch whose position ids sit in the same tensor memory as the last one's (same id, data pointer and
    version counter: what a freed-and-reused allocation looks like) gets the attention of its own packing."""
    ref, ours = _model("sdpa"), _model(attention.NAME)
    pos = torch.zeros(1, 16, dtype=torch.long)
    for seed, lengths in ((0, [5, 9, 2]), (1, [3, 3, 10]), (2, [16])):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 1400, (1, 16), generator=g)
        pos.data.copy_(torch.cat([torch.arange(n) for n in lengths])[None])  # .data: the version does not move
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids=ids, position_ids=pos, use_cache=False).logits,
                                       ref(input_ids=ids, position_ids=pos.clone(), use_cache=False).logits,
                                       atol=1e-5, rtol=1e-5)


def test_packed_perplexity_over_many_batches_equals_sdpa():
    """The packed held-out evaluation (many batches of one shape, one after another) gives SDPA's perplexity."""
    from datasets import Dataset

    from tunelab.eval.perplexity import perplexity

    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(48):
        n = [8, 16, 24][i % 3]  # packs of exactly 48 tokens: every batch has one shape, and memory gets reused
        ids = torch.randint(3, 1400, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    ds = Dataset.from_list(rows)
    ref = perplexity(_model("sdpa"), ds, batch_size=2, pack_tokens=48, progress=False)
    ours = perplexity(_model(attention.NAME), ds, batch_size=2, pack_tokens=48, progress=False)
    assert ours["tokens"] == ref["tokens"]
    assert ours["nll"] == pytest.approx(ref["nll"], rel=1e-5)
