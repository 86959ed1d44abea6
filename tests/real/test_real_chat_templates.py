"""Every registry template renders byte-identically to its family's official template, and its loss mask
is exactly the assistant turns, checked token by token against an independent computation.

The official templates are TRL 1.16's copies (trl/chat_templates/*.jinja) or test assets
(tests/assets/chat_templates/official/, with their sources). The tokenizer is SmolLM2's real
vocabulary plus each family's special tokens, so masks are checked on real BPE boundaries.
"""

from __future__ import annotations

import pytest
from chat_cases import CONVERSATIONS, FAMILIES, SPECIAL, expected_mask

from tunelab.data.templates import (
    REGISTRY,
    ChatTemplateChoice,
    TemplateMismatch,
    apply_choice,
    choose_template,
    render_with_mask,
)

pytestmark = pytest.mark.real


def family_tokenizer(tokenizer_dir, name):
    from transformers import AutoTokenizer

    _, _, _, bos, eos = FAMILIES[name]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL if t not in tok.get_vocab()]})
    if bos:
        tok.bos_token = bos
    if eos:
        tok.eos_token = eos
    return tok


def test_the_registry_has_every_family_the_tests_cover():
    assert set(FAMILIES) == set(REGISTRY)


CASES = [(f, c, kw) for f in FAMILIES for c in CONVERSATIONS
         for kw in ([{}, {"enable_thinking": False}] if f == "qwen3" else [{}])]


@pytest.mark.parametrize("family,conversation,kwargs", CASES,
                         ids=[f"{f}-{c}{'-nothink' if kw else ''}" for f, c, kw in CASES])
def test_registry_template_matches_official_and_masks_exactly(smollm2_tokenizer_dir, family, conversation, kwargs):
    official_of, cues, eot, _, _ = FAMILIES[family]
    official = official_of()
    messages, tools, needs = CONVERSATIONS[conversation]
    tok = family_tokenizer(smollm2_tokenizer_dir, family)
    entry = REGISTRY[family]
    apply_choice(tok, ChatTemplateChoice(entry.name, entry.text, "marked", entry.end_of_turn, entry, official, kwargs))
    supported = {"system": entry.system, "tools": entry.tools, "reasoning": entry.reasoning}.get(needs, True)
    try:
        theirs = tok.apply_chat_template(messages, tools=tools, chat_template=official, tokenize=False, **kwargs)
    except Exception:  # noqa: BLE001 -- the official template refuses this conversation
        theirs = None
    if not supported or theirs is None:
        # what the template cannot render (or would silently drop) is refused, never trained half-rendered
        with pytest.raises(TemplateMismatch, match={"system": "system", "tools": "tool", "reasoning": "reasoning"}[needs]):
            render_with_mask(tok, messages, tools)
        assert not supported, f"the official {family} template refuses {conversation}, which the registry says it renders"
        return
    ours = tok.apply_chat_template(messages, tools=tools, chat_template=entry.text, tokenize=False, **kwargs)
    assert ours == theirs  # byte-identical rendering
    ids, mask = render_with_mask(tok, messages, tools)
    want_ids, want_mask = expected_mask(tok, theirs, cues, eot)
    assert ids == want_ids
    assert mask == want_mask, "\n".join(f"{m} {w} {tok.convert_ids_to_tokens(i)!r}" for i, m, w in zip(ids, mask, want_mask)
                                        if m != w)
    # the stop token is trained at the end of every assistant turn, and no user/system/tool text is
    eot_id = tok.convert_tokens_to_ids(eot)
    ends = [j for j in range(len(mask)) if mask[j] and (j + 1 == len(mask) or not mask[j + 1])]
    assert ends and all(ids[j] == eot_id for j in ends)
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    for m in messages:
        if m["role"] != "assistant" and len(m["content"]) > 3:
            assert m["content"] not in trained


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_auto_recognises_the_official_template(smollm2_tokenizer_dir, family):
    """model.chat_template: auto on a model that ships the official template trains with the registry version."""
    tok = family_tokenizer(smollm2_tokenizer_dir, family)
    tok.chat_template = FAMILIES[family][0]()
    choice = choose_template(None, tok)
    assert choice.name == family
    assert choice.reference == tok.chat_template  # every row is also rendered with the model's own template


def test_qwen3_history_reasoning_is_dropped_and_never_trained(smollm2_tokenizer_dir):
    """The case that started it: Qwen3 renders the earlier turn without its reasoning. The prefix difference
    would put the loss on the user turn in between; the registry template's mask is the rendering's."""
    tok = family_tokenizer(smollm2_tokenizer_dir, "qwen3")
    official = FAMILIES["qwen3"][0]()
    messages = CONVERSATIONS["reasoning"][0]
    tok.chat_template = official
    unmarked = ChatTemplateChoice("model", official, "prefix")
    apply_choice(tok, unmarked)
    with pytest.raises(TemplateMismatch, match="differently"):
        render_with_mask(tok, messages)
    apply_choice(tok, choose_template(None, tok))
    ids, mask = render_with_mask(tok, messages)
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert "Two plus three" not in tok.decode(ids)  # dropped from history, as Qwen3 renders it
    assert trained == "5<|im_end|><think>\nFive times four is twenty.\n</think>\n\n20<|im_end|>"
