"""Ollama export: every registry template's Modelfile TEMPLATE, rendered as Ollama renders it (Go template, the
Modelfile's SYSTEM inserted when a conversation has none), gives the exact text the Jinja training template gives."""

from __future__ import annotations

import pytest

from gotemplate import render
from tunelab.data.templates import REGISTRY
from tunelab.errors import UserError
from tunelab.models.builtin import builtin_tokenizer
from tunelab.models.ollama import STOPS, TEMPLATES, build_modelfile

CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Hi there"}],
    "system + user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "two turns": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
                  {"role": "user", "content": "And 3+3?\nThanks"}],
    "system + two turns": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "U1"},
                           {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}],
}


def _modelfile_fields(text: str) -> dict:
    import re

    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    return {"template": template, "system": system.group(1) if system else None, "stops": stops}


def ollama_render(fields: dict, messages: list[dict]) -> str:
    """What Ollama renders for a chat request: the Modelfile's SYSTEM first when the request has no system message."""
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    if fields["system"] and not any(m["Role"] == "system" for m in msgs):
        msgs = [{"Role": "system", "Content": fields["system"]}, *msgs]
    return render(fields["template"], {"Messages": msgs, "System": fields["system"] or ""})


def test_every_registry_template_has_an_ollama_template():
    assert set(TEMPLATES) == set(REGISTRY) == set(STOPS)


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_modelfile_template_renders_like_the_training_template(name, conv):
    entry = REGISTRY[name]
    messages = CONVERSATIONS[conv]
    if not entry.system and any(m["role"] == "system" for m in messages):
        pytest.skip(f"{name} refuses a system message (so does Ollama's model: no SYSTEM is written)")
    tok = builtin_tokenizer()
    text, meta = build_modelfile("model.gguf", name, tok, entry.text, add_bos=False)
    fields = _modelfile_fields(text)
    expected = tok.apply_chat_template(messages, chat_template=entry.text, tokenize=False, add_generation_prompt=True)
    assert ollama_render(fields, messages) == expected
    assert fields["stops"][0] in (entry.end_of_turn, tok.eos_token) and text.startswith("FROM ./model.gguf\n")


def test_default_system_prompt_and_bos():
    tok = builtin_tokenizer()
    text, meta = build_modelfile("m.gguf", "smollm2", tok, REGISTRY["smollm2"].text, add_bos=False)
    assert meta["system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert build_modelfile("m.gguf", "chatml", tok, REGISTRY["chatml"].text, add_bos=False)[1]["system"] is None
    # llama3 writes bos_token itself: literal in the TEMPLATE unless llama.cpp adds it (add_bos_token in the GGUF)
    assert _modelfile_fields(build_modelfile("m.gguf", "llama3", tok, REGISTRY["llama3"].text, False)[0])[
        "template"].startswith(tok.bos_token)
    assert not _modelfile_fields(build_modelfile("m.gguf", "llama3", tok, REGISTRY["llama3"].text, True)[0])[
        "template"].startswith(tok.bos_token)


def test_unknown_template_is_refused():
    with pytest.raises(UserError, match="no Ollama TEMPLATE"):
        build_modelfile("m.gguf", "vicuna", builtin_tokenizer(), "{{ messages }}", add_bos=False)


def test_export_ollama_cli(run_cli, tmp_path):
    out = tmp_path / "ollama"
    rc, stdout, stderr = run_cli("export", "ollama", "builtin:tiny-llama", "-o", out, "--type", "f16")
    assert rc == 0, stderr
    text = (out / "Modelfile").read_text(encoding="utf-8")
    assert (out / "model.gguf").is_file() and text.startswith("FROM ./model.gguf")
    assert 'PARAMETER stop "<|im_end|>"' in text and "ollama create" in stdout + stderr
    rc, _, stderr = run_cli("export", "ollama", "builtin:tiny-llama", "-o", out)
    assert rc == 2 and "not an empty folder" in stderr
