"""Canonical rows -> ``input_ids`` and ``labels`` (-100 where no loss is taken).

Conversations go through the chat template the run trains with (``tunelab.data.templates``):
the mask is exactly the assistant turns of the rendering of the whole conversation, found from
``{% generation %}`` markers or by a prefix difference that is checked on every row. A row whose
mask cannot be found exactly raises ``TemplateMismatch``; it is never trained with a guess.
"""

from __future__ import annotations

from typing import Any

from tunelab.data.templates import ControlTokens, TemplateMismatch, choice_of, render_ids, render_with_mask

IGNORE = -100
__all__ = ["IGNORE", "TemplateMismatch", "encode_messages", "encode_pair", "encode_prompt", "encode_row"]

# ``literal`` below: the tokenizer's control tokens when ``data.control_tokens: as_text`` asks for their text in
# a row to be encoded as plain text (never as their control ids); None encodes text as the tokenizer does.


def _plain(tokenizer: Any, text: str, add_special_tokens: bool, literal: ControlTokens | None) -> list[int]:
    """Token ids of plain text (no template); under ``literal`` control-token text is split into ordinary tokens."""
    split = literal is not None and literal.pattern is not None and literal.pattern.search(text) is not None
    return list(tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=split)["input_ids"])


def encode_messages(tokenizer: Any, messages: list[dict[str, Any]], tools: Any = None,
                    literal: ControlTokens | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a 0/1 mask of its assistant tokens (content and end-of-turn)."""
    return render_with_mask(tokenizer, messages, tools, literal)


def encode_row(tokenizer: Any, row: dict[str, Any], train_on_prompt: bool,
               literal: ControlTokens | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one canonical row."""
    eos = tokenizer.eos_token_id
    if "messages" in row:
        ids, mask = encode_messages(tokenizer, row["messages"], row.get("tools"), literal)
    elif "prompt" in row:
        p = _plain(tokenizer, row["prompt"], True, literal)
        c = _plain(tokenizer, row["completion"], False, literal) + [eos]
        ids, mask = p + c, [0] * len(p) + [1] * len(c)
    else:
        ids = _plain(tokenizer, row["text"], True, literal) + [eos]
        mask = [1] * len(ids)
    if train_on_prompt:
        mask = [1] * len(ids)
    labels = [t if m else IGNORE for t, m in zip(ids, mask)]
    return ids, labels


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_pair(tokenizer: Any, pair: dict[str, Any],
                literal: ControlTokens | None = None) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) of one canonical preference pair.

    Conversations: the prompt is rendered with the generation prompt (``<|im_start|>assistant``
    and the like), each response is what the full conversation adds after it, through its
    end-of-turn token (the newline a template writes after it is not part of the response). If a template
    renders the prompt differently inside the full conversation, the prompt is cut where the
    renderings diverge, so prompt + response is always exactly the rendered conversation.
    Plain text: the prompt with the tokenizer's special tokens, each response without, plus eos.
    """
    if isinstance(pair["prompt"], list):
        p = render_ids(tokenizer, pair["prompt"], add_generation_prompt=True, literal=literal)
        c = render_ids(tokenizer, pair["prompt"] + pair["chosen"], literal=literal)
        r = render_ids(tokenizer, pair["prompt"] + pair["rejected"], literal=literal)
        k = min(len(p), _common_prefix(p, c), _common_prefix(p, r))
        return p[:k], _end_at_turn_end(tokenizer, c[k:]), _end_at_turn_end(tokenizer, r[k:])
    eos = [tokenizer.eos_token_id]
    p = _plain(tokenizer, pair["prompt"], True, literal)
    c = _plain(tokenizer, pair["chosen"], False, literal) + eos
    r = _plain(tokenizer, pair["rejected"], False, literal) + eos
    return p, c, r


def _end_at_turn_end(tokenizer: Any, response: list[int]) -> list[int]:
    """A response through its end-of-turn token: the separator a template writes after it is not the model's."""
    eot_name = choice_of(tokenizer).end_of_turn or tokenizer.eos_token
    eot = tokenizer.convert_tokens_to_ids(eot_name) if eot_name else None
    if eot is None or eot not in response:
        return response
    end = len(response) - response[::-1].index(eot)
    if end < len(response) and not tokenizer.decode(response[end:]).strip():
        return response[:end]
    return response


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt rendered with the generation prompt: what the policy continues.

    Never with ``literal``: trainers render prompt rows again themselves (TRL applies the chat template), so
    control-token text in a prompt is always refused (``pipeline``), not encoded as text.
    """
    return render_ids(tokenizer, messages, add_generation_prompt=True)
