"""RoPE extension: our frequencies vs transformers' and vs the formulas, the YaRN temperature, the guards."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tunelab.models.builtin import builtin_model, builtin_tokenizer
from tunelab.patches.rope import RopePatch, apply_rope, rope_parameters, scaled_inv_freq

ATOL = 1e-7


def _config(rope: dict, max_pos: int = 2048, hidden: int = 4096, heads: int = 32) -> LlamaConfig:
    """A Llama config (no weights) with the given rope_parameters, as transformers' own rope tests use."""
    return LlamaConfig(hidden_size=hidden, num_attention_heads=heads, max_position_embeddings=max_pos,
                       rope_parameters=rope)


def _theirs(rope: dict, seq_len: int | None = None, **kw) -> tuple[torch.Tensor, float]:
    cfg = _config(rope, **kw)
    return ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, None, seq_len=seq_len)


# ---- parity with transformers ---------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0, 10.0])
def test_linear_equals_transformers(factor):
    ours, scale = scaled_inv_freq("linear", 10000.0, 128, factor, 2048)
    theirs, their_scale = _theirs({"rope_type": "linear", "rope_theta": 10000.0, "factor": factor})
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    assert scale == their_scale == 1.0


@pytest.mark.parametrize("factor", [2.0, 10.0, 20.0])
@pytest.mark.parametrize("seq_len", [1, 1024, 2048, 2049, 4096, 16384])
def test_dynamic_ntk_equals_transformers_at_several_lengths(factor, seq_len):
    # transformers' dynamic RoPE reads max_position_embeddings as the original length
    ours, scale = scaled_inv_freq("dynamic_ntk", 10000.0, 128, factor, 2048, seq_len=seq_len)
    theirs, their_scale = _theirs({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": factor}, seq_len=seq_len)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    assert scale == their_scale == 1.0
    if seq_len <= 2048:  # no scaling up to the original length
        torch.testing.assert_close(ours, scaled_inv_freq("linear", 10000.0, 128, 1.0, 2048)[0], rtol=0, atol=ATOL)


@pytest.mark.parametrize("factor", [2.0, 4.0, 10.0, 16.0, 20.0, 32.0])
@pytest.mark.parametrize(("beta_fast", "beta_slow"), [(32, 1), (1000, 1), (16, 2)])
def test_yarn_equals_transformers(factor, beta_fast, beta_slow):
    # LlamaConfig() geometry (head_dim 128, θ 10000, 2048 positions) with factor 10 and β 32/1 is the
    # setting of transformers' own numerical snapshot test for yarn
    ours, scale = scaled_inv_freq("yarn", 10000.0, 128, factor, 2048, beta_fast=beta_fast, beta_slow=beta_slow)
    theirs, their_scale = _theirs({"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor,
                                   "original_max_position_embeddings": 2048, "beta_fast": beta_fast,
                                   "beta_slow": beta_slow})
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    assert scale == pytest.approx(their_scale, abs=ATOL) and scale == pytest.approx(0.1 * math.log(factor) + 1)


def test_yarn_explicit_attention_factor_and_other_geometries():
    for dim, base, original in ((64, 500000.0, 8192), (32, 10000.0, 128), (128, 1000000.0, 32768)):
        ours, scale = scaled_inv_freq("yarn", base, dim, 4.0, original, attention_factor=0.5)
        heads = 8
        theirs, their_scale = _theirs({"rope_type": "yarn", "rope_theta": base, "factor": 4.0,
                                       "original_max_position_embeddings": original, "attention_factor": 0.5},
                                      max_pos=original * 4, hidden=dim * heads, heads=heads)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
        assert scale == their_scale == 0.5


# ---- static NTK-aware and NTK-by-parts against the formulas, written out independently ----------------


def _theta(base: float, dim: int) -> list[float]:
    return [base ** (-2 * d / dim) for d in range(dim // 2)]


@pytest.mark.parametrize(("base", "dim", "factor"), [(10000.0, 128, 4.0), (10000.0, 32, 8.0), (500000.0, 64, 2.0)])
def test_static_ntk_is_base_scaling(base, dim, factor):
    ours, scale = scaled_inv_freq("ntk", base, dim, factor, 2048)
    b2 = base * factor ** (dim / (dim - 2))
    expected = torch.tensor([b2 ** (-2 * d / dim) for d in range(dim // 2)], dtype=torch.float64)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=0)
    assert scale == 1.0
    # the property that motivates it: the highest frequency is kept, the lowest divided by exactly s
    assert float(ours[0]) == 1.0
    last = _theta(base, dim)[-1]
    assert float(ours[-1]) == pytest.approx(last / factor, rel=1e-5)


def _by_parts_reference(base: float, dim: int, factor: float, original: int, alpha: float, beta: float) -> list[float]:
    """NTK-by-parts from its definition: pair d rotates r_d = L / λ_d times over the original length.

    Pairs with r_d > β keep θ_d, pairs with r_d < α get θ_d / s. In between, the weight on θ_d
    runs linearly in the pair index from the last pair above β to the first pair below α (the
    YaRN authors' discretisation: the crossing indices rounded outwards).
    """
    theta = _theta(base, dim)
    r = [original / (2 * math.pi / t) for t in theta]

    def crossing(rotations: float) -> float:  # the fractional pair index where r_d = rotations
        return dim / 2 * math.log(original / (2 * math.pi * rotations)) / math.log(base)

    lo = max(math.floor(crossing(beta)), 0)
    hi = min(math.ceil(crossing(alpha)), dim - 1)
    out = []
    for d, t in enumerate(theta):
        if r[d] > beta and d <= lo:
            w = 1.0
        elif r[d] < alpha and d >= hi:
            w = 0.0
        else:
            w = 1.0 - min(max((d - lo) / (hi - lo), 0.0), 1.0)
        out.append(w * t + (1 - w) * t / factor)
    return out


@pytest.mark.parametrize(("base", "dim", "factor", "original"),
                         [(10000.0, 128, 4.0, 2048), (10000.0, 128, 16.0, 4096), (10000.0, 32, 4.0, 128),
                          (500000.0, 64, 8.0, 8192)])
def test_ntk_by_parts_equals_its_definition(base, dim, factor, original):
    ours, scale = scaled_inv_freq("ntk_by_parts", base, dim, factor, original, beta_fast=32, beta_slow=1)
    expected = torch.tensor(_by_parts_reference(base, dim, factor, original, 1.0, 32.0), dtype=torch.float64)
    torch.testing.assert_close(ours.double(), expected, rtol=2e-6, atol=0)
    assert scale == 1.0
    theta = torch.tensor(_theta(base, dim), dtype=torch.float64)
    r = original * theta / (2 * math.pi)
    assert torch.allclose(ours.double()[r > 32][:1], theta[r > 32][:1], rtol=1e-6)  # fastest pair: untouched
    assert torch.allclose(ours.double()[r < 1], theta[r < 1] / factor, rtol=1e-6)  # slow pairs: interpolated
    # YaRN is NTK-by-parts with the temperature: same frequencies
    torch.testing.assert_close(scaled_inv_freq("yarn", base, dim, factor, original)[0], ours, rtol=0, atol=0)


# ---- YaRN's temperature on the attention logits -----------------------------------------------------


@pytest.mark.parametrize("factor", [2.0, 4.0, 16.0])
def test_yarn_scales_attention_logits_at_distance_zero(factor):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = builtin_model("tiny-llama")
    plain = model.model.rotary_emb
    apply_rope(model, RopePatch(name="rope", method="yarn", factor=factor))
    yarn = model.model.rotary_emb
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 5, 32, generator=g), torch.randn(1, 1, 5, 32, generator=g)
    pos = torch.arange(5)[None]
    logits = {}
    for name, rotary in (("plain", plain), ("yarn", yarn)):
        cos, sin = rotary(q, pos)
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
        logits[name] = (q_rot * k_rot).sum(-1)  # query i with key i: relative distance 0
    raw = (q * k).sum(-1)
    torch.testing.assert_close(logits["plain"], raw, rtol=1e-5, atol=1e-5)  # a rotation keeps q·k at distance 0
    torch.testing.assert_close(logits["yarn"], raw * (0.1 * math.log(factor) + 1) ** 2, rtol=1e-5, atol=1e-5)


# ---- the patch on a model: guards, save and reload -----------------------------------------------------


def test_guards_theta_original_length_and_factor():
    model, tok = builtin_model("tiny-llama"), builtin_tokenizer()
    assert model.config.max_position_embeddings == 1024
    apply_rope(model, RopePatch(name="rope", method="yarn", target_length=4096), tok)
    params = model.config.rope_parameters
    assert params["rope_theta"] == 10000.0  # survives
    assert params["original_max_position_embeddings"] == 1024  # the pre-extension length, not 4096
    assert params["factor"] == 4.0 and model.config.max_position_embeddings == 4096 == tok.model_max_length

    cfg = builtin_model("tiny-llama").config
    with pytest.raises(ValueError, match="not target_length"):
        rope_parameters(RopePatch(name="rope", method="yarn", factor=4, target_length=2048), cfg)
    with pytest.raises(ValueError, match="not longer"):
        rope_parameters(RopePatch(name="rope", method="linear", target_length=512), cfg)
    # an explicit original length (a model trained shorter than its config says)
    params, new_max, _ = rope_parameters(RopePatch(name="rope", method="yarn", factor=4,
                                                   original_max_position_embeddings=128), cfg)
    assert params["original_max_position_embeddings"] == 128 and new_max == 512
    # dynamic NTK keeps max_position_embeddings: transformers reads it as the length where scaling starts
    assert rope_parameters(RopePatch(name="rope", method="dynamic_ntk", factor=4), cfg)[1] == 1024
    # extending an already scaled RoPE is refused
    with pytest.raises(ValueError, match="already 'yarn'"):
        rope_parameters(RopePatch(name="rope", method="linear", factor=2), model.config)


@pytest.mark.parametrize("method", ["linear", "ntk", "dynamic_ntk", "ntk_by_parts", "yarn"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_saved_model_reloads_in_plain_transformers_with_identical_logits(tmp_path, method, name):
    from transformers import AutoModelForCausalLM

    model = builtin_model(name)
    apply_rope(model, RopePatch(name="rope", method=method, factor=4, original_max_position_embeddings=64))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.rope_parameters == model.config.rope_parameters
    ids = torch.randint(3, 1400, (1, 256), generator=torch.Generator().manual_seed(1))  # 4x the original 64
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
        unpatched = builtin_model(name)(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.allclose(ours, unpatched, atol=1e-4)  # the patch changed the model at 4x the length


def test_recipe_patch_is_checked_at_validate(tmp_path, run_cli):
    """Schema problems first; then the patch against the model's config (read without weights)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: builtin:quickstart/sft\n"
                   "patches: [{name: rope, method: ntk, factor: 2, attention_factor: 1.2}]\n")
    rc, _, err = run_cli("validate", str(bad))
    assert rc == 2 and "patches[0]: attention_factor applies to yarn only" in err
    bad.write_text("extends: builtin:quickstart/sft\n"  # builtin:tiny-llama, 1024 positions
                   "patches: [{name: rope, method: yarn, factor: 4, target_length: 2048}]\n")
    rc, _, err = run_cli("validate", str(bad))
    assert rc == 2 and "patches[0]: factor 4 x original length 1024 = 4096, not target_length 2048" in err
    good = tmp_path / "good.yaml"
    good.write_text("extends: builtin:quickstart/sft\npatches: [{name: rope, method: yarn, target_length: 4096}]\n")
    rc, out, err = run_cli("validate", str(good))
    assert rc == 0, err


def test_reset_dynamic_rope_undoes_a_longer_pass():
    import copy

    from tunelab.patches.rope import reset_dynamic_rope

    model = builtin_model("tiny-llama").eval()
    apply_rope(model, RopePatch(name="rope", method="dynamic_ntk", factor=2, original_max_position_embeddings=32))
    fresh = copy.deepcopy(model)
    ids = torch.randint(3, 1400, (1, 96), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = fresh(input_ids=ids[:, :32]).logits
        model(input_ids=ids)  # grows the frequencies for 96 tokens
        stale = model(input_ids=ids[:, :32]).logits  # transformers does not reset at exactly the original length
        assert reset_dynamic_rope(model) == 1
        again = model(input_ids=ids[:, :32]).logits
    assert not torch.allclose(stale, expected, atol=1e-5)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    assert reset_dynamic_rope(builtin_model("tiny-llama")) == 0  # nothing dynamic: nothing touched
