"""Inference loading and merging (models/inference.py): a merged model computes the adapter model's logits."""

import json
from pathlib import Path

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
