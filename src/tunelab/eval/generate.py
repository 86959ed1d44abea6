"""Generation through the chat template, and BLEU / ROUGE-L against references."""

from __future__ import annotations

from typing import Any


def generate(model: Any, tokenizer: Any, messages: list[dict[str, str]], **gen: Any) -> str:
    """The assistant's reply to ``messages`` (the chat template adds the generation prompt)."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    else:  # a base model without a template: plain text continuation
        enc = tokenizer("\n".join(m["content"] for m in messages), return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    gen = {k: v for k, v in gen.items() if v is not None}
    if gen.get("temperature", 0) and gen["temperature"] > 0:
        gen["do_sample"] = True
    else:
        gen.pop("temperature", None)
        gen.pop("top_p", None)
        gen.pop("top_k", None)
        gen["do_sample"] = False
    model.eval()
    with torch.no_grad():
        out = model.generate(**enc, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **gen)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def rouge_l(hypotheses: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (0-100)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)]
    return 100.0 * sum(scores) / max(len(scores), 1)
