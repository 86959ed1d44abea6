"""The DeepSeek-V3 export of an MLA model (patches/mla/export.py).

The export is checked against stock transformers ``DeepseekV3ForCausalLM``: the exported
checkpoint must compute the converted model's logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM

from tunelab.models.builtin import builtin_config, builtin_model
from tunelab.patches.mla.attention import MLACache
from tunelab.patches.mla.convert import convert_to_mla
from tunelab.patches.mla.export import deepseek_rope_theta, export_deepseek


def llama(kv_heads: int = 2) -> torch.nn.Module:
    """tiny-llama (4 query heads of 32 dims) with the given number of KV heads, fixed weights."""
    if kv_heads == 2:
        return builtin_model("tiny-llama").eval()
    cfg = builtin_config("tiny-llama")
    cfg.num_key_value_heads = kv_heads
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def token_ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1400, (batch, length), generator=g)


def logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


def converted_for_export(kv_heads: int = 2, partial_rope: str = "high") -> torch.nn.Module:
    return convert_to_mla(llama(kv_heads), 40, 8, partial_rope=partial_rope, rope_key="shared", latent_norm=True,
                          calibration_ids=token_ids(4, 16, seed=7))


@pytest.mark.parametrize("kv_heads, partial_rope, layout", [
    (2, "high", "interleaved"), (2, "uniform", "half-split"), (4, "high", "half-split"), (4, "uniform", "interleaved"),
])
def test_export_loads_in_stock_transformers_with_the_same_logits(tmp_path, kv_heads, partial_rope, layout) -> None:
    model = converted_for_export(kv_heads, partial_rope)
    model.save_pretrained(tmp_path / "mla")
    summary = export_deepseek(tmp_path / "mla", tmp_path / "ds", rope_layout=layout)
    config = json.loads((tmp_path / "ds" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    assert config["first_k_dense_replace"] == config["num_hidden_layers"] == 2
    assert config["rope_interleave"] == (layout == "interleaved")
    assert summary["rope_theta"] == pytest.approx(10000.0 ** (8 / 32) if partial_rope == "high" else 10000.0)
    stock = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ds").eval()
    assert all(type(layer.mlp).__name__ == "DeepseekV3MLP" for layer in stock.model.layers)
    ids = token_ids(2, 24)
    ours = logits(model, ids)
    torch.testing.assert_close(logits(stock, ids), ours, atol=1e-4, rtol=0)

    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(stock.generate(ids, **kwargs), model.generate(ids, past_key_values=MLACache(), **kwargs))

    # the check can fail: the same weights read with the other RoPE layout give other logits
    stock.config.rope_interleave = not stock.config.rope_interleave
    assert (logits(stock, ids) - ours).abs().max() > 1e-3


def test_export_copies_the_tokenizer(tmp_path) -> None:
    from tunelab.models.builtin import builtin_tokenizer

    converted_for_export().save_pretrained(tmp_path / "mla")
    builtin_tokenizer().save_pretrained(tmp_path / "mla")
    assert export_deepseek(tmp_path / "mla", tmp_path / "ds")["tokenizer"]
    assert (tmp_path / "ds" / "tokenizer.json").exists()


@pytest.mark.parametrize("name, kwargs, match", [
    ("tiny-llama", dict(rope_key="per-head", latent_norm=True), "--rope-key shared"),
    ("tiny-llama", dict(rope_key="shared"), "--latent-norm"),
    ("tiny-llama", dict(rope_key="shared", latent_norm=True, partial_rope="low"), "not 0, s, 2s"),
    ("tiny-llama", dict(rope_key="shared", latent_norm=True, partial_rope="2-norm"), "--partial-rope high"),
    ("tiny-qwen2", dict(rope_key="shared", latent_norm=True), "biases"),
])
def test_export_refuses_what_deepseek_cannot_represent(tmp_path, name, kwargs, match) -> None:
    calibration = token_ids(2, 16) if kwargs.get("partial_rope") == "2-norm" else None
    model = convert_to_mla(builtin_model(name).eval(), 24, 8, calibration_ids=calibration, **kwargs)
    model.save_pretrained(tmp_path / "mla")
    with pytest.raises(ValueError, match=match):
        export_deepseek(tmp_path / "mla", tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_deepseek_rope_theta_of_uniform_pairs_needs_a_divisor() -> None:
    model = convert_to_mla(llama(), 24, 12, partial_rope="uniform", rope_key="shared", latent_norm=True)
    with pytest.raises(ValueError, match="rope_dim/2 dividing head_dim/2"):  # 6 pairs of 16: not a progression
        deepseek_rope_theta(model.config)
