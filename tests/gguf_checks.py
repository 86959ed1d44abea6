"""Checks shared by the GGUF export tests on trained models: the file read by transformers' GGUF loader and
by llama.cpp (llama-cpp-python, where installed) against the merged Hugging Face model."""

from __future__ import annotations

from pathlib import Path

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Give me three tips for sleeping well."]


def chat_ids(tok, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def f16_rounded(model):
    """The model with every >= 2-D weight rounded through float16 (what an f16 GGUF stores; 1-D stays f32)."""
    import copy

    import torch

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim >= 2:
                p.copy_(p.half().float())
    return ref


def logits_gap(a, b, ids) -> tuple[float, float]:
    """(max |logit difference|, max |logit| of a) on one sequence."""
    import torch

    with torch.no_grad():
        la, lb = a(torch.tensor([ids])).logits[0], b(torch.tensor([ids])).logits[0]
    return (la - lb).abs().max().item(), la.abs().max().item()


def read_back(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def greedy_hf(model, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        return model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()


def greedy_llama_cpp(path: Path, tok, question: str, n: int) -> tuple[list[int], list[int]]:
    """(llama.cpp's own tokenization of the chat prompt, its greedy tokens up to and including end-of-generation)."""
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    out: list[int] = []
    for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(t)
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t):  # eos, eot and the like: where llama.cpp stops
            break
        if len(out) >= n:
            break
    llm.close()
    return ids, out
