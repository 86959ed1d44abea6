"""Attention for packed rows on SDPA: each packed example attends within itself, at its own size.

A best-fit packed row of 512 tokens holds several examples whose position ids restart at 0.
transformers' SDPA path builds a block-diagonal causal mask from those position ids and computes
the full 512 x 512 score matrix per head, almost all of it masked away (the examples of the
bundled chat data average under 100 tokens). ``packed_sdpa`` finds the examples from the position
ids once per forward pass, gathers them into batches of similar length (right-padded, so causal
attention never reaches a pad), runs SDPA with ``is_causal`` on each batch, and scatters the
outputs back: the same attention (``tests/unit/models/test_attention.py``), a fraction of the
score work. A position that is an example of one token (the pads ``PackedRowsCollator`` adds, at
position 0 each) attends only to itself: its output is its value. Anything else (a KV cache,
rows without restarts, an attention mask) goes to transformers' own SDPA function unchanged.

``use_packed_sdpa(model)`` switches a model on SDPA to it; tunelab does so for SFT on packed
rows (training and the packed held-out evaluation).
"""

from __future__ import annotations

from typing import Any

NAME = "tunelab_packed_sdpa"
_BUCKET_SLACK = 1.25  # a batch of examples is padded to at most this times its shortest member


def _plan(position_ids: Any) -> list[tuple[Any, Any, int]] | None:
    """Batches of (flat index [n, W] into B*T, valid mask [n, W], W) for the examples of ``position_ids``
    longer than one token; None when no row restarts (nothing is packed)."""
    import torch

    pos = position_ids.detach().cpu()
    batch, width = pos.shape
    # transformers' own rule (masking_utils.find_packed_sequence_indices): an example starts wherever the
    # position does not follow the previous one
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    if not bool(starts[:, 1:].any()):
        return None
    segments = []
    for b in range(batch):
        edges = starts[b].nonzero().flatten().tolist() + [width]
        segments += [(b * width + s, e - s) for s, e in zip(edges[:-1], edges[1:]) if e - s > 1]
    segments.sort(key=lambda x: x[1])
    plan, i = [], 0
    while i < len(segments):
        j = i + 1
        while j < len(segments) and segments[j][1] <= _BUCKET_SLACK * segments[i][1]:
            j += 1
        group = segments[i:j]
        w = group[-1][1]
        offsets = torch.arange(w)
        first = torch.tensor([s for s, _ in group])
        lengths = torch.tensor([n for _, n in group])
        valid = offsets[None, :] < lengths[:, None]
        index = first[:, None] + torch.minimum(offsets[None, :], lengths[:, None] - 1)  # pads repeat the last token
        plan.append((index.to(position_ids.device), valid.to(position_ids.device), w))
        i = j
    return plan


_cache: dict[str, Any] = {"positions": None, "plan": None}


def _cached_plan(position_ids: Any) -> Any:
    """One plan per forward pass: every layer gets the same position ids. The cache is keyed by their values
    (a new batch's tensor can reuse a freed one's memory and id, so identity is no key)."""
    import torch

    cached = _cache["positions"]
    if cached is None or cached.shape != position_ids.shape or cached.device != position_ids.device \
            or not torch.equal(cached, position_ids):
        _cache["positions"], _cache["plan"] = position_ids.detach().clone(), _plan(position_ids)
    return _cache["plan"]


def packed_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers attention interface: [B, H, T, D] query/key/value in, ([B, T, H, D], None) out."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    usable = (position_ids is not None and position_ids.dim() == 2 and query.shape[2] == key.shape[2] > 1
              and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
              and not getattr(module, "sliding_window", None)
              and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
              and tuple(position_ids.shape) == (query.shape[0], query.shape[2]))
    plan = _cached_plan(position_ids) if usable else None
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, width, dim = query.shape
    groups = heads // key.shape[1]
    q = query.transpose(1, 2).reshape(batch * width, heads, query.shape[-1])
    k = key.transpose(1, 2).reshape(batch * width, key.shape[1], key.shape[-1])
    v = value.transpose(1, 2).reshape(batch * width, value.shape[1], value.shape[-1])
    # a one-token example (a pad) attends to itself alone: its output is its own value
    out = v.repeat_interleave(groups, dim=1) if groups > 1 else v.clone()
    for index, valid, _ in plan:
        qs, ks, vs = (t[index].transpose(1, 2) for t in (q, k, v))  # [n, heads, W, dim]
        o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scaling,
                                           enable_gqa=groups > 1)
        out = out.index_copy(0, index[valid], o.transpose(1, 2)[valid])
    return out.view(batch, width, heads, value.shape[-1]), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa)
    # the mask transformers builds for this name is SDPA's own: the fallback above uses it, the packed path
    # gets none (no attention_mask is passed with packed rows, so none is built)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_packed_sdpa(model: Any) -> bool:
    """Switch a model whose attention is SDPA to ``packed_sdpa``; True if it was switched."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    return True
