"""GGUF export: written with the gguf package, read back by transformers' own GGUF loader (an independent reader).

The logits of the file's model must equal those of the source model with its weights rounded the
way the file stores them (f16/bf16 casts; Q8_0 by an independent re-implementation of the block
format below), so a wrong tensor name, a missing q/k permutation or a dropped head shows as a
mismatch far above the rounding.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

from tunelab.errors import UserError  # noqa: E402
from tunelab.models.builtin import BUILTIN_MODELS, builtin_tokenizer  # noqa: E402
from tunelab.models.gguf_export import _permute, run_export_gguf, strip_generation_markers, write_gguf  # noqa: E402

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30? Don't guess."}]


def _model(model_type: str, tied: bool = True, **extra):
    """A built-in-sized random model whose attention is sharp (q/k scaled up), so q/k layout errors show."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _, base = BUILTIN_MODELS[{"llama": "tiny-llama", "mistral": "tiny-mistral"}.get(model_type, "tiny-qwen2")]
    cfg = AutoConfig.for_model(model_type, **{**base, "tie_word_embeddings": tied, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(30)  # attention scores of order 1, not 1e-3: a wrong rotary layout moves the logits
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)  # norms that are not all ones: a missing norm tensor shows
    return model


def _rounded(model, kind: str):
    """The source model with every >=2-D weight rounded as the file stores it (1-D tensors stay F32)."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim >= 2:
                p.copy_(_q8_0(p) if kind == "q8_0" else p.to({"f16": torch.float16, "bf16": torch.bfloat16,
                                                              "f32": torch.float32}[kind]).float())
    return ref


def _q8_0(w):
    """Q8_0 as ggml's reference quantizer defines it: blocks of 32 along a row, d = max|x| / 127,
    q = roundf(x * (1 / d)) with the f32 scale, and the scale stored (so dequantized) as f16."""
    blocks = w.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    x = blocks * torch.where(d > 0, 1 / d, 0)
    q = torch.sign(x) * torch.floor(x.abs() + 0.5)  # roundf: halves away from zero
    return (q * d.to(torch.float16).float()).reshape(w.shape)


def _read_back(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_permute_interleaves_the_rotary_halves():
    """One head of dim 4: Hugging Face rotates (x0, x2) and (x1, x3); llama.cpp rotates adjacent pairs."""
    import numpy as np

    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    assert _permute(w, 1)[:, 0].tolist() == [0, 4, 2, 6]  # rows 0, 2, 1, 3
    two_heads = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert _permute(two_heads, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("model_type,tied,extra", [
    ("llama", True, {}),                      # the quickstart's architecture, tied like it
    ("llama", False, {}),                     # an untied head: output.weight written and read back
    ("qwen2", True, {}),                      # q/k/v biases, no permutation
    ("mistral", False, {}),                   # written as llama (llama.cpp's graph for both); read back as llama
    ("qwen3", False, {"head_dim": 128}),      # q/k norms, head_dim != hidden / heads (the reader assumes 128)
])
def test_round_trip_through_transformers_reader(tmp_path, model_type, tied, extra):
    model = _model(model_type, tied, **extra)
    tok = builtin_tokenizer()
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = tmp_path / "m.gguf"
    info = write_gguf(model, tok, out, "f32")
    back, _ = _read_back(out)
    assert back.config.model_type == {"mistral": "llama"}.get(model_type, model_type)
    assert back.config.tie_word_embeddings is tied and info["tied_embeddings"] is tied
    expected = _logits(model, ids)
    assert (expected.max() - expected.min()) > 1.0  # the check below is on logits that vary
    torch.testing.assert_close(_logits(back, ids), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,atol", [("f16", 2e-4), ("bf16", 2e-4), ("q8_0", 2e-4)])
def test_stored_types_equal_the_source_rounded_as_stored(tmp_path, kind, atol):
    """f16/bf16/Q8_0 files: equal to the source with its weights rounded the same way, far closer than unrounded."""
    model = _model("llama", tied=False)
    tok = builtin_tokenizer()
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = tmp_path / f"m-{kind}.gguf"
    info = write_gguf(model, tok, out, kind)
    stored = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[kind]
    assert set(info["tensor_types"]) == {stored, "F32"}  # norms stay F32, as llama.cpp keeps 1-D tensors
    got = _logits(_read_back(out)[0], ids)
    torch.testing.assert_close(got, _logits(_rounded(model, kind), ids), atol=atol, rtol=0)
    rounding = (got - _logits(model, ids)).abs().max().item()
    assert rounding > 10 * atol  # the rounding is visible: equality with the rounded reference is not vacuous


def test_tokenizer_template_and_stops_travel(tmp_path):
    model = _model("llama")
    tok = builtin_tokenizer()
    out = tmp_path / "m.gguf"
    info = write_gguf(model, tok, out, "f16")
    _, back = _read_back(out)
    for text in ["Hello world! It's 12345.", "naïve café 你好 🤖\n\n  x\ty", "<|im_start|>user\nhi<|im_end|>\n"]:
        assert back(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
    assert back.eos_token == "<|im_end|>" and info["eos"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert not re.search(r"\{%-?\s*(end)?generation", back.chat_template)  # transformers-only loss-mask tags removed
    assert re.search(r"\{%-?\s*generation", tok.chat_template)  # ... which the training template has
    rendered = back.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert rendered == tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)


def test_strip_generation_markers():
    text = "{%- if a %}{% generation %}{{ x }}{%- endgeneration -%}{% endif %}"
    assert strip_generation_markers(text) == "{%- if a %}{{ x }}{% endif %}"


def test_export_refuses_what_it_cannot_write(tmp_path):
    model = _model("llama")
    model.config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                    "original_max_position_embeddings": 1024}
    with pytest.raises(UserError, match="RoPE scaling 'yarn'"):
        write_gguf(model, builtin_tokenizer(), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.partial").exists()
    with pytest.raises(UserError, match="does not end in .gguf"):
        run_export_gguf("builtin:tiny-llama", tmp_path / "x.bin")
    with pytest.raises(UserError, match="unknown type"):
        run_export_gguf("builtin:tiny-llama", tmp_path / "x.gguf", "q4_k")
    adapter = tmp_path / "prefix"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(UserError, match="PREFIX_TUNING adapter"):
        run_export_gguf(str(adapter), tmp_path / "x.gguf")


def test_export_cli_builtin(run_cli, tmp_path):
    out = tmp_path / "tiny.gguf"
    rc, stdout, stderr = run_cli("export", "gguf", "builtin:tiny-qwen2", "-o", out, "--type", "q8_0")
    assert rc == 0, stderr
    assert out.is_file() and "qwen2" in stdout + stderr and "Q8_0" in stdout + stderr
    rc, _, stderr = run_cli("export", "gguf", "builtin:tiny-qwen2", "-o", tmp_path / "x.gguf", "--type", "q2")
    assert rc == 2 and "--type" in stderr
