"""PEFT: a fresh LoRA changes nothing, merging is exact, every PEFT method trains on CPU."""

import json
from pathlib import Path
from unittest import mock

import pytest
import torch

from tunelab.models.builtin import builtin_model, builtin_tokenizer
from tunelab.models.inference import load_for_inference, run_merge
from tunelab.models.peft import apply_peft
from tunelab.specs import LoraSpec

IDS = torch.tensor([[1, 100, 200, 300, 400, 2, 17, 99]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fresh_adapter_changes_no_logit(method):
    base = builtin_model("tiny-llama").eval()
    before = logits(base)
    model = apply_peft(builtin_model("tiny-llama"), LoraSpec(method=method, r=8, alpha=16, dropout=0.0),
                       builtin_tokenizer()).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert torch.count_nonzero(p) == 0, name  # B starts at zero
    torch.testing.assert_close(logits(model), before, atol=1e-6, rtol=0)


def test_lora_scaling_is_alpha_over_r():
    """One LoRA linear by hand: y = W x + (B A x) * alpha / r (alpha / sqrt(r) with rsLoRA)."""
    for rslora in (False, True):
        model = apply_peft(builtin_model("tiny-llama"), LoraSpec(method="lora", r=4, alpha=12, dropout=0.0,
                                                                  use_rslora=rslora, target_modules=["q_proj"]),
                           builtin_tokenizer()).eval()
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        torch.manual_seed(0)
        layer.lora_B["default"].weight.data.normal_()
        x = torch.randn(3, layer.in_features)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        scale = 12 / (4 ** 0.5 if rslora else 4)
        want = x @ layer.base_layer.weight.T + (x @ a.T @ b.T) * scale
        with torch.no_grad():
            torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_model_equals_adapter_model(method, tmp_path: Path):
    tok = builtin_tokenizer()
    base = builtin_model("tiny-llama")
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    base.name_or_path = str(base_dir)  # what from_pretrained would have set; peft records it in the adapter
    model = apply_peft(base, LoraSpec(method=method, r=8, alpha=16, dropout=0.0), tok)
    torch.manual_seed(1)
    for name, p in model.named_parameters():  # make the adapter non-trivial
        if "lora_" in name:
            p.data.normal_(0, 0.05)
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    tok.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    adapter_logits = logits(model.eval())
    run_merge(str(adapter_dir), tmp_path / "merged")
    merged, _ = load_for_inference(str(tmp_path / "merged"))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged.eval()), adapter_logits, atol=1e-5, rtol=0)
    assert (logits(merged) - logits(builtin_model("tiny-llama").eval())).abs().max() > 1e-3


def test_qlora_base_is_really_4bit():
    import bitsandbytes as bnb

    from tunelab.models.load import load_model
    from tunelab.specs import ModelSpec, QuantizationSpec

    model = load_model(ModelSpec(path="builtin:tiny-llama"), QuantizationSpec(compute_dtype="float32"),
                       full_finetune=False)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q k v o gate up down in each of the 2 layers
    assert layers[0].weight.quant_type == "nf4"
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    ref = logits(builtin_model("tiny-llama").eval())
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.5  # close to the fp32 model, but quantized (not identical)
    assert (out - ref).abs().max() > 0


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
