"""Perplexity: exp of the mean negative log-likelihood over every trained token of a dataset.

Token-weighted over the whole dataset (not a mean of per-batch means), with the usual shift:
the logit at position t scores the label at t+1.
"""

from __future__ import annotations

import math
from typing import Any

from tunelab.data.collate import PackedRowsCollator, pad_right
from tunelab.eval.progress import progress as bar_for
from tunelab.models.logits import scored_logits

IGNORE = -100


def token_nll(model: Any, input_ids: Any, labels: Any, attention_mask: Any) -> tuple[float, int]:
    """(sum of NLL, number of scored tokens) for one padded batch."""
    import torch.nn.functional as F

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, -input_ids.shape[1] :, :]  # prompt tuning prepends virtual-token logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    return float(nll), int((shift_labels != IGNORE).sum().item())


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of ``batch_size``, shortest rows first (little padding per batch)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def packs(lengths: list[int], pack_tokens: int) -> list[list[int]]:
    """Row indices packed into groups of at most ``pack_tokens`` tokens (first fit over rows longest first)."""
    out: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for k, free in enumerate(room):
            if lengths[i] <= free:
                out[k].append(i)
                room[k] -= lengths[i]
                break
        else:
            out.append([i])
            room.append(pack_tokens - lengths[i])
    return out


def packed_nll(model: Any, rows: list[dict[str, Any]], device: Any, pad_id: int) -> tuple[float, int]:
    """(sum of NLL, scored tokens) of packed rows, batched exactly as training batches them.

    Each packed row holds several examples whose position ids restart at 0 (``PackedRowsCollator``):
    transformers masks attention block-diagonally, so no example sees another. Logits are taken
    only where a label is scored.
    """
    import torch.nn.functional as F

    batch = PackedRowsCollator(pad_id)(rows)
    labels = batch.pop("labels")
    batch.pop("num_real_tokens")
    target = labels[:, 1:]
    r, c = (target != IGNORE).nonzero(as_tuple=True)
    if r.numel() == 0:
        return 0.0, 0
    inputs = {k: v.to(device) for k, v in batch.items()}
    # no cache: transformers reads packed position ids as separate sequences only without one (as in training)
    inputs["use_cache"] = False
    logits = scored_logits(model, inputs, r.to(device), c.to(device))
    nll = F.cross_entropy(logits.float(), target[r, c].to(device), reduction="sum")
    return float(nll), int(r.numel())


def _packed_rows(rows: list[dict[str, Any]], max_tokens: int) -> list[dict[str, Any]]:
    """Rows packed first-fit (longest first) into rows of at most ``max_tokens``, with their seq_lengths."""
    out = []
    for group in packs([len(r["input_ids"]) for r in rows], max_tokens):
        members = [rows[i] for i in group]
        out.append({"input_ids": [t for m in members for t in m["input_ids"]],
                    "labels": [t for m in members for t in m["labels"]],
                    "seq_lengths": [len(m["input_ids"]) for m in members], "n": len(members)})
    return out


def perplexity(model: Any, dataset: Any, batch_size: int = 8, pad_id: int = 0, progress: bool = True,
               pack_tokens: int | None = None) -> dict[str, float]:
    """{"perplexity", "nll", "tokens"} of ``model`` over rows with input_ids and labels.

    With ``pack_tokens`` rows are packed into rows of up to that many tokens, ``batch_size`` packed
    rows per forward pass, logits only at scored positions: the shape training runs at, so it is
    at least as fast per token as the training forward pass (docs/real-models.md). Without it
    (prefix/prompt tuning, whose virtual tokens cannot be packed) rows are padded in batches of
    similar length. The sum
    does not depend on how rows are grouped. A progress bar shows rows done (stderr).
    """
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    rows = [dataset[i] for i in range(len(dataset))]
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        pack_tokens = None  # virtual tokens are prepended to every row: rows cannot share one
    bar = bar_for(len(rows) if progress else 0, "eval perplexity")
    with torch.no_grad():  # not inference_mode: a dynamic RoPE cache updated here is reused by training
        if pack_tokens:
            packed = _packed_rows(rows, pack_tokens)
            for start in range(0, len(packed), batch_size):
                chunk = packed[start : start + batch_size]
                s, c = packed_nll(model, chunk, device, pad_id)
                total, count = total + s, count + c
                bar.update(sum(p["n"] for p in chunk))
        else:
            for idx in length_batches([len(r["input_ids"]) for r in rows], batch_size):
                batch = [rows[i] for i in idx]
                ids, mask = pad_right([r["input_ids"] for r in batch], pad_id)
                labels, _ = pad_right([r["labels"] for r in batch], IGNORE)
                s, c = token_nll(model, ids.to(device), labels.to(device), mask.to(device))
                total, count = total + s, count + c
                bar.update(len(batch))
    bar.close()
    if was_training:
        model.train()
    mean = total / max(count, 1)
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count}
