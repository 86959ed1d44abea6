"""Chat templates (data/templates.py): unknown templates get an exact mask or a refusal; registry names; reasoning
a template would drop. Tiny tokenizer, no weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "real"))
from chat_cases import expected_mask  # noqa: E402

from tunelab.data.templates import (  # noqa: E402
    TemplateMismatch,
    apply_choice,
    choose_template,
    render_with_mask,
)
from tunelab.models.builtin import builtin_tokenizer  # noqa: E402

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 3 plus 4?"},
    {"role": "assistant", "content": "It is 7."},
    {"role": "user", "content": "And 5 plus 5?"},
    {"role": "assistant", "content": "It is 10."},
]


# renders every turn the same way wherever it sits: the prefix difference is exact
CONSISTENT = ("{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] }}{% if m['role'] == 'assistant' %}"
              "{{ '<|im_end|>' }}{% endif %}{{ '\\n\\n' }}{% endfor %}{% if add_generation_prompt %}"
              "{{ '### assistant:\\n' }}{% endif %}")


# renders earlier assistant turns shortened, the last one in full (as Qwen3 drops earlier reasoning)
HISTORY_DIFFERS = ("{% for m in messages %}{{ '### ' + m['role'] + ':\\n' }}{% if m['role'] == 'assistant' and not loop.last "
                   "%}{{ m['content'][:4] }}{% else %}{{ m['content'] }}{% endif %}{% if m['role'] == 'assistant' %}"
                   "{{ '<|im_end|>' }}{% endif %}{{ '\\n\\n' }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '### assistant:\\n' }}{% endif %}")


def tokenizer_with(template: str):
    tok = builtin_tokenizer()
    tok.chat_template = template
    apply_choice(tok, choose_template(None, tok))
    return tok


def test_unknown_consistent_template_gets_the_exact_mask_by_prefix_difference():
    tok = tokenizer_with(CONSISTENT)
    assert tok.tunelab_template.mode == "prefix"
    ids, mask = render_with_mask(tok, CONVERSATION)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert (ids, mask) == expected_mask(tok, text, ["### assistant:\n"], "<|im_end|>")
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "It is 7.<|im_end|>It is 10.<|im_end|>"
    assert tok.tunelab_template.end_of_turn == "<|im_end|>"  # read off the row, then checked on every row


def test_unknown_template_that_renders_history_differently_is_refused():
    tok = tokenizer_with(HISTORY_DIFFERS)
    with pytest.raises(TemplateMismatch, match="differently inside the whole conversation") as exc:
        render_with_mask(tok, CONVERSATION)
    assert "qwen3" in str(exc.value) and "{% generation %}" in str(exc.value)  # the registry and the fix
    # one assistant turn: nothing differs, so the prefix difference is exact there
    ids, mask = render_with_mask(tok, CONVERSATION[:3])
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "It is 7.<|im_end|>"


def test_unknown_template_whose_turns_do_not_end_with_a_special_token_is_refused():
    no_stop = CONSISTENT.replace("{{ '<|im_end|>' }}", "{{ '.' }}")
    with pytest.raises(TemplateMismatch, match="not with an end-of-turn special token"):
        render_with_mask(tokenizer_with(no_stop), CONVERSATION)


def test_registry_name_is_used_over_the_models_own_template():
    tok = builtin_tokenizer()
    tok.chat_template = CONSISTENT

    class Spec:
        chat_template = "chatml"
        chat_template_kwargs: dict = {}

    apply_choice(tok, choose_template(Spec, tok))
    assert tok.tunelab_template.name == "chatml" and "<|im_start|>" in tok.chat_template
    ids, mask = render_with_mask(tok, CONVERSATION)
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "It is 7.<|im_end|>It is 10.<|im_end|>"


def test_reasoning_the_template_would_drop_is_refused():
    tok = builtin_tokenizer()
    apply_choice(tok, choose_template(type("S", (), {"chat_template": "chatml"}), tok))
    row = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "two twos"}]
    with pytest.raises(TemplateMismatch, match="reasoning_content"):
        render_with_mask(tok, row)
