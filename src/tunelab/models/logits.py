"""Logits only where they are scored.

A causal LM's head maps every position's last hidden state to the vocabulary. Training and
evaluation on response tokens only need it at the positions whose next token has a label: for a
chat SFT batch that is often well under half of the positions, and on a 50k-vocabulary model the
head and its cross-entropy are a large part of the step (the logits of a 2 x 512 batch of
SmolLM2 are 200 MB in fp32, before their gradient). ``scored_logits`` runs the decoder, picks the
scored positions' hidden states, and applies the head to those alone: the same logits, the same
gradients (``tests/unit/methods/test_sft.py``), less compute and memory.
"""

from __future__ import annotations

from typing import Any

# config attributes of models whose LM head output is post-processed (Gemma 2/3 soft-capping, Cohere's scale)
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale")


def head_and_decoder(model: Any) -> tuple[Any, Any] | None:
    """(LM head, decoder) when the model's logits are exactly ``head(decoder(...).last_hidden_state)``;
    None where that does not hold or cannot be known (prompt learning prepends virtual tokens in the
    PEFT wrapper's own forward; soft-capped or scaled logits; no ``get_decoder``)."""
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    config = getattr(base, "config", None)
    if head is None or decoder is None or decoder is base or config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(c, a, None) for c in (config, text_config) for a in LOGIT_POSTPROCESSING):
        return None
    return head, decoder


def scored_logits(model: Any, inputs: dict[str, Any], rows: Any, cols: Any) -> Any:
    """Logits at (rows, cols) of the input positions, shape [len(rows), vocab].

    ``rows``/``cols`` index the real tokens of ``inputs["input_ids"]`` (for prompt tuning, whose
    logits carry virtual tokens in front, the last ``seq_len`` logits are the real ones).
    """
    parts = head_and_decoder(model)
    if parts is None:
        logits = model(**inputs).logits
        return logits[:, -inputs["input_ids"].shape[1]:][rows, cols]
    head, decoder = parts
    hidden = decoder(**inputs).last_hidden_state
    return head(hidden[rows, cols])
