"""MLA attention (patches/mla/attention.py): the latent cache (cached forward and generation equal uncached, what the
cache stores) and the absorbed path (equal to the plain one)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.models.builtin import builtin_config, builtin_model
from tunelab.patches.mla.attention import MLACache
from tunelab.patches.mla.convert import convert_to_mla, kv_cache_bytes_per_token, set_absorbed


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


def low_rank(name: str = "tiny-llama", attn_implementation: str = "sdpa") -> torch.nn.Module:
    model = builtin_model(name, attn_implementation=attn_implementation)
    return convert_to_mla(model.eval(), kv_lora_rank=40, rope_dim=8, partial_rope="uniform")


def llama(kv_heads: int = 2) -> torch.nn.Module:
    """tiny-llama (4 query heads of 32 dims) with the given number of KV heads, fixed weights."""
    if kv_heads == 2:
        return builtin_model("tiny-llama").eval()
    cfg = builtin_config("tiny-llama")
    cfg.num_key_value_heads = kv_heads
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


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
