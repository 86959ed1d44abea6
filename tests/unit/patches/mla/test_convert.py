"""MLA conversion (patches/mla/convert.py): exactness at full rank, partial RoPE choices, the shared (DeepSeek) RoPE
key and the latent norm, compression error, sizes, save/reload, argument errors; training with the mla patch."""

from __future__ import annotations

import copy
import json
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.models.builtin import builtin_config, builtin_model
from tunelab.patches.mla.attention import MLAAttention
from tunelab.patches.mla.convert import (
    convert_to_mla,
    kv_cache_bytes_per_token,
    load_mla_model,
    reconstruction_error,
    select_rope_pairs,
    shared_rope_mix,
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


def llama(kv_heads: int = 2) -> torch.nn.Module:
    """tiny-llama (4 query heads of 32 dims) with the given number of KV heads, fixed weights."""
    if kv_heads == 2:
        return builtin_model("tiny-llama").eval()
    cfg = builtin_config("tiny-llama")
    cfg.num_key_value_heads = kv_heads
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


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


def low_rank(name: str = "tiny-llama", attn_implementation: str = "sdpa") -> torch.nn.Module:
    model = builtin_model(name, attn_implementation=attn_implementation)
    return convert_to_mla(model.eval(), kv_lora_rank=40, rope_dim=8, partial_rope="uniform")


def test_llama2_7b_geometry_saves_92_19_percent() -> None:
    dims = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128}
    before = kv_cache_bytes_per_token(dims)
    after = kv_cache_bytes_per_token({**dims, "kv_lora_rank": 512, "rope_dim": 4})
    assert before == 2 * 32 * 32 * 128 * 2
    assert after == 32 * (512 + 32 * 4) * 2
    assert round(100 * (1 - after / before), 2) == 92.19


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


def test_shared_key_reconstruction_error_falls_with_rank() -> None:
    model = llama(4)
    errors = [reconstruction_error(model, convert_to_mla(copy.deepcopy(model), rank, 8, rope_key="shared"))
              for rank in (8, 32, 64, 96, 128)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6  # 128 = hidden size bounds the rank of [W_k residual; W_v]


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


RECIPE = """\
model: {{path: "{path}"}}
{extra}
data:
  train: [{{source: "builtin:quickstart/sft", format: messages}}]
  eval: [{{source: "builtin:quickstart/sft_eval", format: messages}}]
  max_length: 256
method: {{name: sft}}
train: {{output_dir: "{out}", max_steps: 2, learning_rate: 1.0e-3, batch_size: 2, logging_steps: 1,
        save_steps: 100}}
"""


def test_train_with_the_mla_patch_saves_a_final_that_reloads(tmp_path, run_cli):
    from tunelab.eval.commands import run_eval

    out = tmp_path / "run"
    recipe = tmp_path / "mla.yaml"
    recipe.write_text(RECIPE.format(path="builtin:tiny-llama", out=out, extra=textwrap.dedent("""\
        patches:
          - {name: mla, kv_lora_rank: 32, rope_dim: 8, partial_rope: 2-norm,
             calibration_data: "builtin:quickstart/text", calibration_samples: 4, calibration_length: 64}""")))
    rc, stdout, stderr = run_cli("train", recipe)
    assert rc == 0, stderr[-3000:]
    assert "patch name mla, kv_lora_rank 32, rope_dim 8, partial_rope 2-norm" in stdout
    assert "kv_cache_bytes_per_token_before 1024, kv_cache_bytes_per_token_after 384" in stdout
    assert json.loads((out / "final" / "config.json").read_text())["mla"]["kv_lora_rank"] == 32
    lock = (out / "recipe.lock.yaml").read_text()
    assert "split: patches[0]" in lock  # the calibration data is fingerprinted
    # the reloaded final/ scores the eval set exactly as the trained model did at the end of training
    after = json.loads((out / "summary.json").read_text())["eval_after"]["perplexity"]
    again = run_eval(str(out), "builtin:quickstart/sft_eval", "messages", 256, 8, None, None, 0)
    assert again["perplexity"] == pytest.approx(after, rel=1e-5)
