"""MLA with a shared (DeepSeek) RoPE key and a latent norm, and the DeepSeek-V3 export.

The export is checked against stock transformers ``DeepseekV3ForCausalLM``: the exported
checkpoint must compute the converted model's logits.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM

from tunelab.models.builtin import builtin_config, builtin_model
from tunelab.patches.mla.attention import MLACache
from tunelab.patches.mla.convert import (
    convert_to_mla,
    kv_cache_bytes_per_token,
    load_mla_model,
    reconstruction_error,
    set_absorbed,
    shared_rope_mix,
)
from tunelab.patches.mla.export import deepseek_rope_theta, export_deepseek

HEAD_DIM = 32


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


# ---------------------------------------------------------------- the shared RoPE key


def test_shared_mix_is_the_top_eigenvector_of_each_pair() -> None:
    """Checked against power iteration, and no random unit mix carries more energy."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(1, 2)  # 5 pairs, 3 heads
    mix = shared_rope_mix(cov)
    assert torch.allclose(mix.norm(dim=-1), torch.ones(5, dtype=torch.float64))
    assert (mix.sum(-1) >= 0).all()
    for f in range(5):
        v = torch.ones(3, dtype=torch.float64)
        for _ in range(500):
            v = cov[f] @ v
            v = v / v.norm()
        v = v * torch.sign(v.sum())
        torch.testing.assert_close(mix[f], v, atol=1e-8, rtol=0)
        trials = torch.randn(1000, 3, generator=g, dtype=torch.float64)
        trials = trials / trials.norm(dim=-1, keepdim=True)
        best = mix[f] @ cov[f] @ mix[f]
        assert (torch.einsum("ni,ij,nj->n", trials, cov[f], trials) <= best + 1e-12).all()


def test_shared_key_with_one_kv_head_equals_the_per_head_key() -> None:
    """With MQA the mix is [1] and nothing is left over: shared == per-head, and == original with every dim RoPE'd."""
    model = llama(kv_heads=1)
    ids = token_ids()
    full = 2 * HEAD_DIM
    shared = convert_to_mla(copy.deepcopy(model), full, 8, rope_key="shared")
    per_head = convert_to_mla(copy.deepcopy(model), full, 8, rope_key="per-head")
    torch.testing.assert_close(logits(shared, ids), logits(per_head, ids), atol=1e-4, rtol=0)
    everything = convert_to_mla(copy.deepcopy(model), full, HEAD_DIM, rope_key="shared")
    torch.testing.assert_close(logits(everything, ids), logits(model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kv_heads, calibrated", [(2, False), (2, True), (4, False), (4, True)])
def test_shared_key_splits_the_keys_exactly(kv_heads: int, calibrated: bool) -> None:
    """Shared key + residual = the original key. At position offset 0 RoPE is the identity, so at full
    rank the model is exact there; at real positions the residual loses its rotation, so it is not."""
    model = llama(kv_heads)
    ids = token_ids()
    calibration = token_ids(4, 16, seed=5) if calibrated else None
    converted = convert_to_mla(copy.deepcopy(model), 2 * kv_heads * HEAD_DIM, 8, rope_key="shared",
                               calibration_ids=calibration)
    zeros = torch.zeros_like(ids)
    torch.testing.assert_close(logits(converted, ids, position_ids=zeros), logits(model, ids, position_ids=zeros),
                               atol=1e-4, rtol=0)
    assert (logits(converted, ids) - logits(model, ids)).abs().max() > 1e-3


def test_shared_key_matches_a_hand_written_reference() -> None:
    """Layer 0 of a shared-key model, written out: NoPE part q_h·r_g unrotated over all dims, RoPE part
    u_f[g]·q_{h,f} rotated against the rotated shared key k'_f = Σ_g u_f[g] k_{g,f}."""
    model = llama(kv_heads=2)
    attn = model.model.layers[0].self_attn
    converted = convert_to_mla(copy.deepcopy(model), 128, 8, partial_rope="uniform", rope_key="shared")
    mla = converted.model.layers[0].self_attn
    pairs = mla.rope_pairs[0]
    mix = torch.tensor(converted.config.mla["rope_mix"][0], dtype=torch.float32)  # (P, n_kv)
    t, half = 6, HEAD_DIM // 2
    x = torch.randn(1, t, 128, generator=torch.Generator().manual_seed(3))
    cos, sin = model.model.rotary_emb(x, torch.arange(t)[None])
    c, s = cos[0, :, :half][:, pairs], sin[0, :, :half][:, pairs]  # (t, P)
    with torch.no_grad():
        q = attn.q_proj(x)[0].view(t, 4, HEAD_DIM)
        k = attn.k_proj(x)[0].view(t, 2, HEAD_DIM)
        v = attn.v_proj(x)[0].view(t, 2, HEAD_DIM)
        ka, kb = k[:, :, pairs], k[:, :, pairs + half]  # (t, n_kv, P)
        shared_a, shared_b = (ka * mix.T).sum(1), (kb * mix.T).sum(1)  # (t, P)
        rot_ka, rot_kb = shared_a * c - shared_b * s, shared_b * c + shared_a * s
        heads = []
        for h in range(4):
            g = h // 2
            residual = k[:, g].clone()
            residual[:, pairs] -= mix[:, g] * shared_a
            residual[:, pairs + half] -= mix[:, g] * shared_b
            qa, qb = mix[:, g] * q[:, h, pairs], mix[:, g] * q[:, h, pairs + half]
            rot_qa, rot_qb = qa * c - qb * s, qb * c + qa * s
            scores = (q[:, h] @ residual.T + rot_qa @ rot_ka.T + rot_qb @ rot_kb.T) / HEAD_DIM**0.5
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v[:, g])
        expected = attn.o_proj(torch.cat(heads, dim=-1))[None]
        got, _ = mla(x, position_embeddings=(cos, sin), attention_mask=None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_shared_key_cache_holds_latent_plus_one_rope_key() -> None:
    model = convert_to_mla(llama(4), 24, 8, rope_key="shared", latent_norm=True)
    ids = token_ids(3, 9)
    cache = MLACache()
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    assert cache.stored_numel_per_token(0) == 24 + 8
    assert cache.nbytes() == 3 * 9 * kv_cache_bytes_per_token(model.config, dtype_bytes=4)
    assert kv_cache_bytes_per_token(model.config, dtype_bytes=4) == 2 * (24 + 8) * 4


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_shared_key_with_latent_norm_generates_the_same_with_and_without_cache(kv_heads: int) -> None:
    model = convert_to_mla(llama(kv_heads), 24, 8, rope_key="shared", latent_norm=True,
                           calibration_ids=token_ids(2, 16, seed=2))
    ids = token_ids(2, 7)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, past_key_values=MLACache(), **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
        plain = model(ids).logits
        absorbed = set_absorbed(model, True)(ids).logits
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(absorbed, plain, atol=1e-4, rtol=0)


def test_shared_key_reconstruction_error_falls_with_rank() -> None:
    model = llama(4)
    errors = [reconstruction_error(model, convert_to_mla(copy.deepcopy(model), rank, 8, rope_key="shared"))
              for rank in (8, 32, 64, 96, 128)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6  # 128 = hidden size bounds the rank of [W_k residual; W_v]


# ---------------------------------------------------------------- the latent norm


def test_latent_norm_starts_at_the_measured_latent_rms() -> None:
    """Layer 0 sees the same inputs before and after conversion: its norm weight is the RMS of the
    plain latent W_down x over the calibration tokens, measured here with a hook."""
    model = llama()
    calibration = token_ids(4, 16, seed=4)
    converted = convert_to_mla(copy.deepcopy(model), 24, 8, latent_norm=True, calibration_ids=calibration)
    mla = converted.model.layers[0].self_attn
    seen = []
    hook = mla.kv_down_proj.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        logits(converted, calibration)
    finally:
        hook.remove()
    rms = seen[0].double().pow(2).mean().sqrt().item()
    torch.testing.assert_close(mla.kv_norm.weight, torch.full((24,), rms, dtype=torch.float32), atol=0, rtol=1e-5)


def test_latent_norm_without_calibration_assumes_unit_rms_inputs() -> None:
    converted = convert_to_mla(llama(), 24, 8, latent_norm=True)
    mla = converted.model.layers[1].self_attn
    gamma = converted.model.layers[1].input_layernorm.weight.double()
    expected = ((mla.kv_down_proj.weight.double() * gamma).pow(2).sum() / 24).sqrt().item()
    torch.testing.assert_close(mla.kv_norm.weight, torch.full((24,), expected, dtype=torch.float32), atol=0,
                               rtol=1e-6)


def test_latent_norm_changes_the_function_at_full_rank() -> None:
    """The norm divides by a per-token RMS: not exact at any rank, unlike the plain latent."""
    model = llama()
    ids = token_ids()
    normed = convert_to_mla(copy.deepcopy(model), 128, HEAD_DIM, latent_norm=True, calibration_ids=ids)
    plain = convert_to_mla(copy.deepcopy(model), 128, HEAD_DIM)
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), atol=1e-4, rtol=0)
    assert (logits(normed, ids) - logits(model, ids)).abs().max() > 1e-3


def test_shared_key_and_latent_norm_save_and_reload(tmp_path) -> None:
    model = convert_to_mla(llama(), 24, 8, rope_key="shared", latent_norm=True, calibration_ids=token_ids(2, 16))
    model.save_pretrained(tmp_path)
    reloaded = load_mla_model(tmp_path)
    assert reloaded.config.mla == model.config.mla
    ids = token_ids()
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=0, rtol=0)


# ---------------------------------------------------------------- DeepSeek-V3 export


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
