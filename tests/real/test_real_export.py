"""SmolLM2-135M-Instruct (from its GGUF wheel) re-exported by `tunelab export gguf`: transformers' GGUF reader gives
logits equal to the model rounded to f16, embeddings stay tied as in the source, and llama.cpp (where installed)
generates the same greedy tokens as transformers."""

from __future__ import annotations

import importlib.util

import pytest

from gguf_checks import QUESTIONS, chat_ids, f16_rounded, greedy_hf, greedy_llama_cpp, logits_gap, read_back

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory):
    from tunelab.models.gguf_export import load_merged, write_gguf

    model, tok = load_merged("builtin:smollm2-135m-instruct")
    out = tmp_path_factory.mktemp("smollm2-gguf") / "smollm2-f16.gguf"
    info = write_gguf(model, tok, out, "f16", name="SmolLM2-135M-Instruct")
    return model, tok, out, info


def test_smollm2_round_trip_through_transformers(smollm2):
    model, tok, out, info = smollm2
    back, back_tok = read_back(out)
    assert info["tied_embeddings"] is back.config.tie_word_embeddings is model.config.tie_word_embeddings is True
    assert info["pre_tokenizer"] == "gpt-2" and back_tok.eos_token == "<|im_end|>"
    ref = f16_rounded(model)
    for q in QUESTIONS[:2]:
        ids = chat_ids(tok, q)
        assert chat_ids(back_tok, q) == ids
        gap, scale = logits_gap(ref, back, ids)
        assert gap < 1e-3 * scale, (q, gap, scale)  # equal to f16-rounded weights up to float32 summation order


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (pip install llama-cpp-python; it compiles llama.cpp)")
def test_smollm2_llama_cpp_greedy_tokens(smollm2):
    model, tok, out, _ = smollm2
    for q in QUESTIONS:
        ids, got = greedy_llama_cpp(out, tok, q, 32)
        assert ids == chat_ids(tok, q)
        assert got and got == greedy_hf(model, ids, 32)[: len(got)], q
