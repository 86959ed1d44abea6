"""MLA conversion (patches/mla/convert.py): exactness at full rank, cache, absorbed path, sizes, save/reload."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.models.builtin import builtin_config, builtin_model
from tunelab.patches.mla.attention import MLAAttention, MLACache
from tunelab.patches.mla.convert import (
    convert_to_mla,
    kv_cache_bytes_per_token,
    load_mla_model,
    reconstruction_error,
    select_rope_pairs,
    set_absorbed,
)

HEAD_DIM = 32


def mha_model() -> torch.nn.Module:
    """tiny-llama with 4 KV heads (MHA instead of GQA), fixed weights."""
    cfg = builtin_config("tiny-llama")
    cfg.num_key_value_heads = 4
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def tiny(name: str) -> torch.nn.Module:
    return mha_model() if name == "mha" else builtin_model(name).eval()


def token_ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1400, (batch, length), generator=g)


def full_rank(model: torch.nn.Module) -> int:
    return 2 * model.config.num_key_value_heads * HEAD_DIM


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", ["mha", "tiny-llama", "tiny-qwen2", "tiny-mistral"])
@pytest.mark.parametrize("svd", ["joint", "split"])
def test_full_rank_all_rope_gives_original_logits(name: str, svd: str) -> None:
    model = tiny(name)
    ids = token_ids()
    with torch.no_grad():
        expected = model(ids).logits
        converted = convert_to_mla(copy.deepcopy(model), kv_lora_rank=full_rank(model), rope_dim=HEAD_DIM, svd=svd)
        assert all(isinstance(layer.self_attn, MLAAttention) for layer in converted.model.layers)
        torch.testing.assert_close(converted(ids).logits, expected, atol=1e-4, rtol=0)


def test_smallest_exact_rank_is_the_value_rank() -> None:
    """With every dim RoPE'd only W_v is compressed: rank num_kv_heads * head_dim is already exact."""
    model = tiny("tiny-llama")
    ids = token_ids()
    with torch.no_grad():
        converted = convert_to_mla(copy.deepcopy(model), kv_lora_rank=2 * HEAD_DIM, rope_dim=HEAD_DIM)
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def rope_on_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Reference: transformers' RoPE on (T, head_dim) but only on the given pairs; the others untouched."""
    half = x.shape[-1] // 2
    out = x.clone()
    for i in pairs.tolist():
        a, b = x[:, i], x[:, i + half]
        out[:, i] = a * cos[:, i] - b * sin[:, i]
        out[:, i + half] = b * cos[:, i + half] + a * sin[:, i + half]
    return out


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_partial_rope_at_full_rank_matches_a_hand_written_reference(name: str) -> None:
    """Only partial RoPE changes the function at full rank; each query head rotates its KV head's pairs."""
    model = tiny(name)
    attn = model.model.layers[0].self_attn
    n_h, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    converted = convert_to_mla(
        copy.deepcopy(model), kv_lora_rank=full_rank(model), rope_dim=8, partial_rope="2-norm",
        calibration_ids=token_ids(2, 16, seed=1),
    )
    mla = converted.model.layers[0].self_attn
    pairs = mla.rope_pairs
    t = 7
    x = torch.randn(1, t, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(t)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        q = attn.q_proj(x)[0].view(t, n_h, HEAD_DIM)
        k = attn.k_proj(x)[0].view(t, n_kv, HEAD_DIM)
        v = attn.v_proj(x)[0].view(t, n_kv, HEAD_DIM)
        heads = []
        for h in range(n_h):
            g = h // (n_h // n_kv)
            qh = rope_on_pairs(q[:, h], cos[0], sin[0], pairs[g])
            kh = rope_on_pairs(k[:, g], cos[0], sin[0], pairs[g])
            scores = qh @ kh.T / HEAD_DIM**0.5
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v[:, g])
        expected = attn.o_proj(torch.cat(heads, dim=-1))[None]
        got, _ = mla(x, position_embeddings=(cos, sin), attention_mask=None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- partial RoPE choices


def test_partial_rope_high_low_uniform() -> None:
    model = tiny("tiny-llama")
    inv_freq = model.model.rotary_emb.inv_freq
    high = select_rope_pairs(model, 8, "high")
    low = select_rope_pairs(model, 8, "low")
    uniform = select_rope_pairs(model, 8, "uniform")
    assert len(high) == model.config.num_hidden_layers
    for g in range(model.config.num_key_value_heads):
        assert high[0][g].tolist() == [0, 1, 2, 3]
        assert low[0][g].tolist() == [12, 13, 14, 15]
        assert uniform[0][g].tolist() == [0, 4, 8, 12]
    # "high" keeps exactly the highest frequencies of the rotary module
    assert set(inv_freq[high[0][0]].tolist()) == set(inv_freq.topk(4).values.tolist())


def test_partial_rope_2_norm_picks_the_largest_norm_products() -> None:
    """Scaling one pair's key rows (or one query head's rows) by 100 makes that pair win, per layer and KV head."""
    model = tiny("tiny-llama")
    half = HEAD_DIM // 2
    with torch.no_grad():
        k_proj = model.model.layers[1].self_attn.k_proj  # layer 1, KV head 1: key pair 9
        for dim in (9, 9 + half):
            k_proj.weight[HEAD_DIM + dim] *= 100.0
        q_proj = model.model.layers[0].self_attn.q_proj  # layer 0, query head 1 (KV head 0): pair 13
        for dim in (13, 13 + half):
            q_proj.weight[HEAD_DIM + dim] *= 100.0
    pairs = select_rope_pairs(model, 4, "2-norm", calibration_ids=token_ids(2, 16))
    assert [p.shape for p in pairs] == [(2, 2), (2, 2)]
    assert 9 in pairs[1][1].tolist() and 9 not in pairs[1][0].tolist()
    assert 13 in pairs[0][0].tolist() and 13 not in pairs[0][1].tolist()
    with pytest.raises(ValueError, match="calibration_ids"):
        select_rope_pairs(model, 4, "2-norm")


# ---------------------------------------------------------------- cache and generation


def low_rank(name: str = "tiny-llama", attn_implementation: str = "sdpa") -> torch.nn.Module:
    model = builtin_model(name, attn_implementation=attn_implementation)
    return convert_to_mla(model.eval(), kv_lora_rank=40, rope_dim=8, partial_rope="uniform")


@pytest.mark.parametrize("name, attn", [("tiny-llama", "sdpa"), ("tiny-qwen2", "sdpa"), ("tiny-llama", "eager")])
def test_two_step_cached_forward_equals_full_forward(name: str, attn: str) -> None:
    model = low_rank(name, attn)
    ids = token_ids(2, 14)
    with torch.no_grad():
        full = model(ids).logits
        cache = MLACache()
        first = model(ids[:, :9], past_key_values=cache, use_cache=True).logits
        second = model(ids[:, 9:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat((first, second), dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("absorb, attn", [(False, "sdpa"), (True, "sdpa"), (False, "eager")])
def test_cached_generation_equals_uncached(absorb: bool, attn: str) -> None:
    """Greedy tokens agree with and without the cache (left padding included), in both attention paths."""
    model = set_absorbed(low_rank("tiny-llama", attn), absorb)
    ids = token_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on the second row
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    cache = MLACache()
    with torch.no_grad():
        cached = model.generate(ids, past_key_values=cache, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
        default_cache = model.generate(ids, use_cache=True, **kwargs)
    assert cached.shape[1] == ids.shape[1] + 10
    assert torch.equal(cached, uncached)
    assert torch.equal(default_cache, uncached)
    assert cache.get_seq_length() == ids.shape[1] + 10 - 1  # the last token is never fed back


def test_cache_stores_only_latent_and_rope_keys() -> None:
    model = low_rank()  # R = 40, 2 KV heads x 8 RoPE dims
    cfg = model.config
    ids = token_ids(3, 11)
    cache = MLACache()
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    per_layer = 40 + 2 * 8
    assert cache.stored_numel_per_token(layer_idx=0) == per_layer
    assert cache.stored_numel_per_token() == cfg.num_hidden_layers * per_layer
    assert cache.nbytes() == 3 * 11 * kv_cache_bytes_per_token(cfg, dtype_bytes=4)
    assert kv_cache_bytes_per_token(cfg, dtype_bytes=4) == cfg.num_hidden_layers * per_layer * 4
    original = {k: v for k, v in cfg.to_dict().items() if k != "mla"}
    assert kv_cache_bytes_per_token(original, dtype_bytes=4) == 2 * 2 * 2 * HEAD_DIM * 4


def test_llama2_7b_geometry_saves_92_19_percent() -> None:
    dims = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128}
    before = kv_cache_bytes_per_token(dims)
    after = kv_cache_bytes_per_token({**dims, "kv_lora_rank": 512, "rope_dim": 4})
    assert before == 2 * 32 * 32 * 128 * 2
    assert after == 32 * (512 + 32 * 4) * 2
    assert round(100 * (1 - after / before), 2) == 92.19


# ---------------------------------------------------------------- absorbed path


@pytest.mark.parametrize("name", ["mha", "tiny-llama", "tiny-qwen2"])
def test_absorbed_path_equals_plain_path(name: str) -> None:
    model = convert_to_mla(tiny(name), kv_lora_rank=24, rope_dim=8, partial_rope="low")
    ids = token_ids(2, 10)
    with torch.no_grad():
        plain = model(ids).logits
        absorbed = set_absorbed(model, True)(ids).logits
    torch.testing.assert_close(absorbed, plain, atol=1e-4, rtol=0)


def test_absorbed_path_at_full_rank_gives_original_logits() -> None:
    model = tiny("tiny-qwen2")
    ids = token_ids()
    with torch.no_grad():
        expected = model(ids).logits
        converted = set_absorbed(convert_to_mla(copy.deepcopy(model), full_rank(model), HEAD_DIM), True)
        torch.testing.assert_close(converted(ids).logits, expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- compression error


@pytest.mark.parametrize("svd", ["joint", "split"])
def test_reconstruction_error_falls_with_rank(svd: str) -> None:
    model = tiny("mha")
    ids = token_ids()
    with torch.no_grad():
        expected = model(ids).logits
    errors, logit_errors = [], []
    for rank in (8, 24, 48, 96, 256):
        converted = convert_to_mla(copy.deepcopy(model), kv_lora_rank=rank, rope_dim=8, svd=svd)
        errors.append(reconstruction_error(model, converted))
        with torch.no_grad():
            logit_errors.append((converted(ids).logits - expected).abs().max().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6  # 256 covers the rank of [W_k_nope; W_v] (at most hidden = 128) for both SVDs
    assert logit_errors[-1] < logit_errors[0]


# ---------------------------------------------------------------- save / reload


def test_save_and_reload_gives_identical_logits(tmp_path) -> None:
    model = convert_to_mla(
        tiny("tiny-qwen2"), kv_lora_rank=32, rope_dim=8, partial_rope="2-norm", svd="split",
        calibration_ids=token_ids(2, 16),
    )
    model.save_pretrained(tmp_path)
    reloaded = load_mla_model(tmp_path)
    assert reloaded.config.mla == model.config.mla
    assert reloaded.config.mla["kv_lora_rank"] == 32
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    for a, b in zip(model.model.layers, reloaded.model.layers):
        assert torch.equal(a.self_attn.rope_pairs, b.self_attn.rope_pairs)


def test_load_refuses_an_unconverted_checkpoint(tmp_path) -> None:
    tiny("tiny-llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no 'mla' block"):
        load_mla_model(tmp_path)


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(kv_lora_rank=129, rope_dim=8), ValueError, "kv_lora_rank"),  # > 2 * 2 KV heads * 32
        (dict(kv_lora_rank=0, rope_dim=8), ValueError, "kv_lora_rank"),
        (dict(kv_lora_rank=32, rope_dim=7), ValueError, "rope_dim"),
        (dict(kv_lora_rank=32, rope_dim=64), ValueError, "rope_dim"),
        (dict(kv_lora_rank=32, rope_dim=0), ValueError, "rope_dim"),
        (dict(kv_lora_rank=32, rope_dim=8, partial_rope="middle"), ValueError, "partial_rope"),
        (dict(kv_lora_rank=32, rope_dim=8, svd="qr"), ValueError, "svd"),
        (dict(kv_lora_rank=32, rope_dim=8, partial_rope="2-norm"), ValueError, "calibration_ids"),
        (dict(kv_lora_rank=32, rope_dim=8, rope_key="single"), ValueError, "rope_key"),
    ],
)
def test_bad_arguments_are_refused_before_any_change(kwargs: dict, error: type, match: str) -> None:
    model = tiny("tiny-llama")
    with pytest.raises(error, match=match):
        convert_to_mla(model, **kwargs)
    assert not isinstance(model.model.layers[0].self_attn, MLAAttention)


def test_unsupported_model_type_and_double_conversion_are_refused() -> None:
    from transformers import GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="llama, qwen2, mistral"):
        convert_to_mla(gpt2, kv_lora_rank=8, rope_dim=4)
    model = low_rank()
    with pytest.raises(ValueError, match="already converted"):
        convert_to_mla(model, kv_lora_rank=8, rope_dim=4)
