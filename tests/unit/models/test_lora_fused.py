"""The fused LoRA update (models/lora_fused.py): PEFT's forward and gradients, PEFT's own path with dropout."""

from unittest import mock

import torch


def _lora_model(**kw):
    from peft import LoraConfig, get_peft_model

    from tunelab.models.builtin import builtin_model

    torch.manual_seed(0)
    model = get_peft_model(builtin_model("tiny-llama"), LoraConfig(r=4, lora_alpha=12, target_modules="all-linear", **kw))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)  # non-zero adapters, so the update is in the comparison
    return model


def _out_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids).logits
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_lora_update_equals_peft_forward_and_gradients():
    from tunelab.models.lora_fused import FusedLoraLinear, fuse_lora_updates

    ids = torch.randint(3, 1400, (2, 16))
    ref_out, ref_grads = _out_and_grads(_lora_model(lora_dropout=0.0), ids)
    model = _lora_model(lora_dropout=0.0)
    n = fuse_lora_updates(model)
    assert n == 7 * model.config.num_hidden_layers  # q k v o gate up down of every layer
    calls = []
    orig = torch.addmm
    with mock.patch.object(torch, "addmm", side_effect=lambda *a, **k: calls.append(1) or orig(*a, **k)):
        out, grads = _out_and_grads(model, ids)
    assert len(calls) == n  # every LoRA layer took the fused path
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in k for k in grads)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-6, rtol=1e-4, msg=k)
    with model.disable_adapter(), torch.no_grad():  # disabled adapters: PEFT's own path, the base model
        base = model(input_ids=ids).logits
    assert not torch.allclose(base, out)
    assert all(isinstance(m, FusedLoraLinear) for m in model.modules() if type(m).__name__.endswith("Linear")
               and hasattr(m, "lora_A"))


def test_fused_lora_falls_back_to_peft_with_dropout():
    from tunelab.models.lora_fused import fuse_lora_updates

    model = _lora_model(lora_dropout=0.1)
    fuse_lora_updates(model)
    with mock.patch.object(torch, "addmm", side_effect=AssertionError("fused path taken")):
        model.train()
        model(input_ids=torch.randint(3, 1400, (1, 8)))
