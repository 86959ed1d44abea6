"""Export a trained model as an Ollama model folder: the GGUF file plus a Modelfile.

The Modelfile's TEMPLATE is Ollama's Go-template version of the chat template the run trained
with (one per registry template, written here by hand: Ollama cannot run Jinja), its SYSTEM is
that template's default system prompt (Ollama inserts it as the first message when a request
has none, which is what the Jinja templates do), and its ``stop`` parameters are the template's
end-of-turn token and the token that opens the next turn. The tests render every TEMPLATE with
a small interpreter of the Go-template subset used here and compare it with the Jinja rendering.

The beginning-of-sequence token: the GGUF says whether llama.cpp adds it (``add_bos_token``);
where the Jinja template writes ``bos_token`` itself and the tokenizer does not add it, the Go
template writes it literally (``{bos}`` below), so the prompt Ollama tokenizes is the one trained on.
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tunelab.data.templates import choice_of, identify
from tunelab.errors import Problem, UserError
from tunelab.log import say
from tunelab.models.gguf_export import load_merged, write_gguf
from tunelab.models.ref import resolve_model

_CHATML = ('{{- range $i, $m := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
           '<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n'
           '{{ if and $last (ne $m.Role "assistant") }}<|im_start|>assistant\n{{ end }}{{- end }}')

TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "smollm2": _CHATML,
    "qwen2.5": _CHATML,
    "qwen3": _CHATML,
    "phi4": ('{{- range $i, $m := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
             '<|im_start|>{{ $m.Role }}<|im_sep|>{{ $m.Content }}<|im_end|>'
             '{{- if and $last (ne $m.Role "assistant") }}<|im_start|>assistant<|im_sep|>{{ end }}{{- end }}'),
    "llama3": ('{bos}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n'
               'Today Date: 26 Jul 2024\n\n'
               '{{ range $i, $m := .Messages }}{{- if eq $m.Role "system" }}{{ $m.Content }}{{- end }}{{- end }}'
               '<|eot_id|>'
               '{{- range $i, $m := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
               '{{- if ne $m.Role "system" }}<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n'
               '{{ $m.Content }}<|eot_id|>{{- end }}'
               '{{- if and $last (ne $m.Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n'
               '{{ end }}{{- end }}'),
    "mistral-v3": ('{bos}{{- $system := "" }}'
                   '{{- range $i, $m := .Messages }}{{- if eq $m.Role "system" }}{{ $system = $m.Content }}'
                   '{{- end }}{{- end }}'
                   '{{- range $i, $m := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
                   '{{- if eq $m.Role "user" }}[INST] {{ if and $last $system }}{{ $system }}\n\n{{ end }}'
                   '{{ $m.Content }}[/INST]'
                   '{{- else if eq $m.Role "assistant" }} {{ $m.Content }}{eos}{{- end }}{{- end }}'),
    "mistral-v7-tekken": ('{bos}{{- range $i, $m := .Messages }}'
                          '{{- if eq $m.Role "system" }}[SYSTEM_PROMPT]{{ $m.Content }}[/SYSTEM_PROMPT]'
                          '{{- else if eq $m.Role "user" }}[INST]{{ $m.Content }}[/INST]'
                          '{{- else if eq $m.Role "assistant" }}{{ $m.Content }}{eos}{{- end }}{{- end }}'),
    "gemma2": ('{bos}{{- range $i, $m := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
               '{{- if eq $m.Role "user" }}<start_of_turn>user\n{{ $m.Content }}<end_of_turn>\n'
               '{{ else if eq $m.Role "assistant" }}<start_of_turn>model\n{{ $m.Content }}<end_of_turn>\n'
               '{{ end }}{{- if and $last (ne $m.Role "assistant") }}<start_of_turn>model\n{{ end }}{{- end }}'),
    "gemma3": ('{bos}{{- $system := "" }}{{- range $i, $m := .Messages }}'
               '{{- $last := eq (len (slice $.Messages $i)) 1 }}'
               '{{- if eq $m.Role "system" }}{{ $system = $m.Content }}'
               '{{- else if eq $m.Role "user" }}<start_of_turn>user\n{{ if $system }}{{ $system }}\n\n{{ end }}'
               '{{ $m.Content }}<end_of_turn>\n{{ $system = "" }}'
               '{{- else if eq $m.Role "assistant" }}<start_of_turn>model\n{{ $m.Content }}<end_of_turn>\n'
               '{{ end }}{{- if and $last (ne $m.Role "assistant") (ne $m.Role "system") }}<start_of_turn>model\n'
               '{{ end }}{{- end }}'),
    "deepseek-r1": ('{bos}{{- range $i, $m := .Messages }}{{- if eq $m.Role "system" }}{{ $m.Content }}{{- end }}'
                    '{{- end }}{{- range $i, $m := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
                    '{{- if eq $m.Role "user" }}<｜User｜>{{ $m.Content }}'
                    '{{- else if eq $m.Role "assistant" }}<｜Assistant｜>{{ $m.Content }}<｜end▁of▁sentence｜>'
                    '{{- end }}{{- if and $last (eq $m.Role "user") }}<｜Assistant｜><think>\n{{ end }}{{- end }}'),
}

# the tokens that end a reply: the end-of-turn token and the one that opens the next turn
STOPS: dict[str, list[str]] = {
    "chatml": ["<|im_end|>", "<|im_start|>"], "smollm2": ["<|im_end|>", "<|im_start|>"],
    "qwen2.5": ["<|im_end|>", "<|im_start|>"], "qwen3": ["<|im_end|>", "<|im_start|>"],
    "phi4": ["<|im_end|>", "<|im_start|>"], "llama3": ["<|eot_id|>", "<|start_header_id|>"],
    "mistral-v3": ["{eos}", "[INST]"], "mistral-v7-tekken": ["{eos}", "[INST]"],
    "gemma2": ["<end_of_turn>", "<start_of_turn>"], "gemma3": ["<end_of_turn>", "<start_of_turn>"],
    "deepseek-r1": ["<｜end▁of▁sentence｜>", "<｜User｜>"],
}
_PROBE = [{"role": "user", "content": "\x00probe\x00"}]


def default_system(tok: Any, template: str) -> str | None:
    """The system prompt the Jinja template writes when a conversation has none (rendered today), or None."""
    plain = tok.apply_chat_template(_PROBE, chat_template=template, tokenize=False, add_generation_prompt=True)
    marker = "\x01system\x01"
    try:
        with_sys = tok.apply_chat_template([{"role": "system", "content": marker}, *_PROBE], chat_template=template,
                                           tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 -- a template that refuses a system message (gemma2) has no default one
        return None
    if marker not in with_sys:
        return None
    head, tail = with_sys.split(marker, 1)
    if plain.startswith(head) and plain.endswith(tail) and len(plain) > len(head) + len(tail):
        return plain[len(head):len(plain) - len(tail)]
    return None


def modelfile_template(name: str, bos: str, eos: str) -> str:
    """The Go TEMPLATE of registry template ``name`` with the literal BOS text (or "") and EOS text."""
    return TEMPLATES[name].replace("{bos}", bos).replace("{eos}", eos)


def _quote(text: str) -> str:
    if '"""' in text:
        raise UserError(Problem("MODEL", 'the chat template or system prompt contains """, which a Modelfile '
                                "cannot quote"))
    return f'"""{text}"""'


def build_modelfile(gguf_name: str, template_name: str, tok: Any, template_text: str,
                    add_bos: bool) -> tuple[str, dict[str, Any]]:
    """(Modelfile text, what it holds) for a GGUF file beside it and the run's registry template."""
    if template_name not in TEMPLATES:
        raise UserError(Problem("MODEL", f"the model trained with chat template {template_name!r}, which has no "
                                "Ollama TEMPLATE here", "train with a registry template: " + ", ".join(TEMPLATES)))
    writes_bos = "bos_token" in template_text and tok.bos_token is not None
    bos = tok.bos_token if writes_bos and not add_bos else ""
    system = default_system(tok, template_text)
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quote(modelfile_template(template_name, bos, tok.eos_token or ''))}"]
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    stops = [s.replace("{eos}", tok.eos_token or "</s>") for s in STOPS[template_name]]
    for stop in stops:
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    lines.append("PARAMETER temperature 0.7")
    return "\n".join(lines) + "\n", {"template": template_name, "system": system, "stops": stops,
                                     "bos": bos, "rendered_on": datetime.date.today().isoformat()}


def run_export_ollama(source: str, output: Path, out_type: str = "q8_0", name: str | None = None) -> Path:
    """`tunelab export ollama`: OUT/model.gguf + OUT/Modelfile; `ollama create NAME -f OUT/Modelfile` where installed."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(Problem("--output", f"{output} exists and is not an empty folder", "give a new folder"))
    resolved = resolve_model(source, key="MODEL")
    model, tok = load_merged(resolved)
    choice = choice_of(tok)
    entry = choice.entry or (identify(tok, tok.chat_template) if tok.chat_template else None)
    if entry is None:
        raise UserError(Problem(resolved.key, f"{source} carries chat template {choice.name!r}, not a registry "
                                "template; an Ollama TEMPLATE exists only for those",
                                "train with model.chat_template set to one of: " + ", ".join(TEMPLATES)))
    output.mkdir(parents=True, exist_ok=True)
    info = write_gguf(model, tok, output / "model.gguf", out_type, name=resolved.short_name)
    text, meta = build_modelfile("model.gguf", entry.name, tok, choice.text or tok.chat_template, info["add_bos"])
    (output / "Modelfile").write_text(text, encoding="utf-8")
    say(f"wrote {output}/model.gguf ({info['bytes'] / 1e6:.1f} MB, {out_type}) and {output}/Modelfile (template "
        f"{entry.name}, stops {', '.join(meta['stops'])}" + (", default system prompt" if meta["system"] else "") + ")")
    if shutil.which("ollama"):
        tag = name or resolved.short_name.lower()
        subprocess.run(["ollama", "create", tag, "-f", str(output / "Modelfile")], check=True)
        say(f"ollama create {tag}: done; run it with: ollama run {tag}")
    else:
        say(f"to load it: ollama create NAME -f {output}/Modelfile && ollama run NAME")
    return output
