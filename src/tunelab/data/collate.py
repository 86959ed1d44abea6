"""Batching packed rows for attention kernels without variable-length support (SDPA, eager).

TRL's padding-free collator concatenates a whole batch into one row. With flash-attention's
varlen kernels that costs nothing, but SDPA and eager attention then compute a dense
(batch * length)^2 score matrix masked block-diagonally: B times the work of B rows of length
L. This collator keeps each packed row a row of its own: rows are right-padded to the longest
in the batch, ``position_ids`` restart at 0 at every packed example (pad positions are 0 too),
and no ``attention_mask`` is passed, so transformers builds a per-row block-diagonal causal mask
from the position ids: packed examples never attend to each other, and pads only to themselves.
The padding this adds is small: best-fit packing fills rows nearly to ``max_length``.
"""

from __future__ import annotations

from typing import Any


class PackedRowsCollator:
    """Collate best-fit packed rows (``input_ids``, ``labels``, ``seq_lengths``) into padded rows."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(examples)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        for i, e in enumerate(examples):
            ids = torch.as_tensor(e["input_ids"], dtype=torch.long)
            length = ids.numel()
            seq_lengths = list(e.get("seq_lengths") or [length])
            if sum(seq_lengths) != length:
                raise ValueError(f"packed row {i}: seq_lengths {seq_lengths} do not add up to {length} tokens")
            input_ids[i, :length] = ids
            labels[i, :length] = torch.as_tensor(e.get("labels", e["input_ids"]), dtype=torch.long)
            position_ids[i, :length] = torch.cat([torch.arange(s) for s in seq_lengths])
        # the first token of each packed example has no in-example prefix to be predicted from
        labels[position_ids == 0] = -100
        # the trainer pops this before the forward: the count of real tokens for the num_tokens metric
        real = sum(len(e["input_ids"]) for e in examples)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "num_real_tokens": real}


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """(ids, attention_mask) of token sequences right-padded to the longest: for scoring passes."""
    import torch

    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, s in enumerate(seqs):
        ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """(ids, attention_mask) of token sequences left-padded to the longest: prompts to generate from."""
    import torch

    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, s in enumerate(seqs):
        if s:
            ids[j, width - len(s):], mask[j, width - len(s):] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def uses_varlen_attention(model: Any) -> bool:
    """Whether the model's attention has variable-length (padding-free) kernels: flash-attention."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return "flash" in impl
