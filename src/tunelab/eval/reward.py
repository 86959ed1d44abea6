"""Reward-model accuracy on preference pairs: the metric of ``tunelab eval --task reward`` and of method reward."""

from __future__ import annotations

from typing import Any

from tunelab.models.inference import score


def pairwise(model: Any, pairs: Any, batch_size: int, pad_id: int) -> dict[str, Any]:
    """Pairwise accuracy (share of pairs with r(chosen) > r(rejected)) and mean margin r(chosen) - r(rejected)."""
    rows = [pairs[i] for i in range(len(pairs))]
    chosen = score(model, [r["prompt_ids"] + r["chosen_ids"] for r in rows], batch_size, pad_id)
    rejected = score(model, [r["prompt_ids"] + r["rejected_ids"] for r in rows], batch_size, pad_id)
    n = max(len(rows), 1)
    return {"pairs": len(rows), "accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
            "margin": sum(c - r for c, r in zip(chosen, rejected)) / n,
            "reward_chosen": sum(chosen) / n, "reward_rejected": sum(rejected) / n}
