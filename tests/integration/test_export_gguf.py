"""The trained quickstart model exported to GGUF: transformers' GGUF reader gives the merged model's logits (f16
within its rounding, Q8_0 within the stated tolerance), and llama.cpp generates the same greedy tokens."""

from __future__ import annotations

import importlib.util
import os
import subprocess

import pytest
from conftest import REPO, tunelab_cmd

from gguf_checks import QUESTIONS, chat_ids, f16_rounded, greedy_hf, greedy_llama_cpp, logits_gap, read_back

pytestmark = pytest.mark.slow
# Q8_0 against the f32 model: max |logit difference| / max |logit| below this, and the same argmax at >= 95% of
# positions (measured 0.004-0.007 and 98-100% on the quickstart model: docs/deploy.md)
Q8_0_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def exported(quickstart_sft, tmp_path_factory):
    run, rc, _, err = quickstart_sft
    assert rc == 0, err[-2000:]
    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for kind in ("f16", "q8_0"):
        files[kind] = out / f"quickstart-{kind}.gguf"
        proc = subprocess.run([*tunelab_cmd(), "export", "gguf", str(run), "-o", str(files[kind]), "--type", kind],
                              capture_output=True, text=True, cwd=REPO, timeout=600, env=dict(os.environ))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "tied embeddings" in proc.stdout + proc.stderr and "<|im_end|>" in proc.stdout + proc.stderr
    return run, files


def test_quickstart_round_trip_through_transformers(exported):
    from tunelab.models.inference import load_for_inference

    run, files = exported
    model, tok = load_for_inference(str(run))
    f16, f16_tok = read_back(files["f16"])
    assert f16.config.tie_word_embeddings is model.config.tie_word_embeddings is True  # tied, as the source
    for q in QUESTIONS:
        ids = chat_ids(tok, q)
        assert chat_ids(f16_tok, q) == ids  # the file's tokenizer and chat template give the same prompt ids
        gap, _ = logits_gap(f16_rounded(model), f16, ids)
        assert gap < 1e-4, q  # f16: equal to the source rounded to f16
    import torch

    q8, _ = read_back(files["q8_0"])
    for q in QUESTIONS:
        ids = chat_ids(tok, q)
        seq = ids + greedy_hf(model, ids, 32)  # the prompt and the model's own answer
        gap, scale = logits_gap(model, q8, seq)
        assert gap / scale < Q8_0_TOLERANCE, (q, gap, scale)
        with torch.no_grad():
            a, b = (m(torch.tensor([seq])).logits[0].argmax(-1) for m in (model, q8))
        assert (a == b).float().mean().item() >= 0.95, q  # the same next token at (nearly) every position


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (pip install llama-cpp-python; it compiles llama.cpp)")
def test_llama_cpp_generates_the_same_greedy_tokens(exported):
    from tunelab.models.inference import load_for_inference

    run, files = exported
    model, tok = load_for_inference(str(run))
    for q in QUESTIONS:
        ids, got = greedy_llama_cpp(files["f16"], tok, q, 32)
        assert ids == chat_ids(tok, q)  # llama.cpp tokenizes the prompt as the training tokenizer does
        assert got == greedy_hf(model, ids, 32)[: len(got)] and got, q
