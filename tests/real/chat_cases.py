"""Conversations, official templates and expected masks for the registry tests (shared by unit and real tests).

The expected mask is computed here independently of tunelab: in the official template's rendering,
every assistant turn runs from the end of its cue (the text that opens an assistant turn) through
the next end-of-turn token; tokens overlapping those character ranges are 1, all others 0.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "chat_templates" / "official"


def trl_template(name: str) -> str:
    """An official template as TRL 1.16 ships it (trl/chat_templates/NAME.jinja)."""
    spec = importlib.util.find_spec("trl")
    return (Path(spec.origin).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def asset_template(name: str) -> str:
    return (ASSETS / f"{name}.jinja").read_text(encoding="utf-8")


PLAIN_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                "{% endif %}")
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
           "system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# name -> (official template loader, assistant cues, end-of-turn, bos, eos)
FAMILIES = {
    "chatml": (lambda: PLAIN_CHATML, ["<|im_start|>assistant\n"], "<|im_end|>", "<|im_start|>", "<|im_end|>"),
    "smollm2": (lambda: SMOLLM2, ["<|im_start|>assistant\n"], "<|im_end|>", "<|im_start|>", "<|im_end|>"),
    "qwen2.5": (lambda: trl_template("qwen2_5"), ["<|im_start|>assistant\n"], "<|im_end|>", None, "<|im_end|>"),
    "qwen3": (lambda: trl_template("qwen3"), ["<|im_start|>assistant\n"], "<|im_end|>", None, "<|im_end|>"),
    "llama3": (lambda: trl_template("llama3_1"), ["<|start_header_id|>assistant<|end_header_id|>\n\n"], "<|eot_id|>",
               "<|begin_of_text|>", "<|eot_id|>"),
    "mistral-v3": (lambda: asset_template("mistral_v3"), ["[/INST]", "[/TOOL_RESULTS]"], "</s>", "<s>", "</s>"),
    "mistral-v7-tekken": (lambda: asset_template("mistral_v7_tekken"), ["[/INST]"], "</s>", "<s>", "</s>"),
    "gemma2": (lambda: trl_template("gemma"), ["<start_of_turn>model\n"], "<end_of_turn>", "<bos>", "<eos>"),
    "gemma3": (lambda: trl_template("gemma3"), ["<start_of_turn>model\n"], "<end_of_turn>", "<bos>", "<eos>"),
    "phi4": (lambda: asset_template("phi4"), ["<|im_start|>assistant<|im_sep|>"], "<|im_end|>", None, "<|im_end|>"),
    "deepseek-r1": (lambda: trl_template("deepseek_r1_distill"), ["<｜Assistant｜>"], "<｜end▁of▁sentence｜>",
                    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
}
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]",
           "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[SYSTEM_PROMPT]",
           "[/SYSTEM_PROMPT]", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<｜begin▁of▁sentence｜>",
           "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<tool_call>", "</tool_call>", "<think>", "</think>"]

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}
# name -> (messages, tools, what it needs: system / reasoning / tools)
CONVERSATIONS = {
    "system-multi-turn": ([
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "The capital of Italy is Rome."},
    ], None, "system"),
    "multi-turn": ([
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two, three."},
        {"role": "user", "content": "Backwards?"},
        {"role": "assistant", "content": "Three, two, one."},
    ], None, ""),
    "reasoning": ([
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "reasoning_content": "Two plus three makes five.", "content": "5"},
        {"role": "user", "content": "Times 4?"},
        {"role": "assistant", "reasoning_content": "Five times four is twenty.", "content": "20"},
    ], None, "reasoning"),
    "think-in-content": ([
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "<think>\nTwo plus three makes five.\n</think>\n\n5"},
        {"role": "user", "content": "Times 4?"},
        {"role": "assistant", "content": "<think>\nFive times four is twenty.\n</think>\n\n20"},
    ], None, ""),
    "tools": ([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "name": "get_weather", "tool_call_id": "call12345", "content": "temperature 18, clear sky"},
        {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
    ], [WEATHER], "tools"),
}


def expected_regions(text: str, cues: list[str], eot: str) -> list[tuple[int, int]]:
    """Character ranges of the assistant turns in an official rendering: after each cue, through the next eot."""
    starts = sorted(i + len(c) for c in cues for i in _find_all(text, c))
    out = []
    for s in starts:
        e = text.find(eot, s)
        assert e >= 0, f"no {eot!r} after position {s}"
        out.append((s, e + len(eot)))
    return out


def _find_all(text: str, needle: str) -> list[int]:
    out, i = [], text.find(needle)
    while i >= 0:
        out.append(i)
        i = text.find(needle, i + 1)
    return out


def expected_mask(tokenizer, text: str, cues: list[str], eot: str) -> tuple[list[int], list[int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    regions = expected_regions(text, cues, eot)
    mask = [int(b > a and any(s < b and a < e for s, e in regions)) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask
