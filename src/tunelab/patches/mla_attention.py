"""Multi-head latent attention (MLA) for converted Llama/Qwen2/Mistral layers, and its latent-only cache.

``MLAAttention`` replaces a stock ``self_attn`` inside the stock decoder layer: same call, same
returns. Per token it computes a latent c_KV = W_down h (shared by all heads) and, per KV head,
``rope_dim`` RoPE'd key dims straight from h (MHA2MLA's per-head decoupled RoPE). Only
[c_KV; k_rope] goes into the cache; the non-RoPE keys and all values are recomputed from the
latent with per-head up-projections (W_UK, W_UV). So the cache holds
``kv_lora_rank + num_kv_heads * rope_dim`` numbers per token per layer instead of
``2 * num_kv_heads * head_dim``.

Layout: every query head's output of ``q_proj`` is ordered [NoPE dims | RoPE dims] (conversion
permutes the rows once), and the RoPE dims are [first halves of the kept pairs | second halves],
so transformers' ``rotate_half`` convention applies to them unchanged. The query of a head uses
RoPE on exactly the frequency pairs its KV head keeps.

Two equal ways to attend (``absorb`` flag):
- plain: up-project the cached latents to keys and values, then ordinary attention;
- absorbed (DeepSeek-V2 inference): fold W_UK into the query (q_nope W_UK gives a query in latent
  space), attend over the latents themselves, and apply W_UV after the weighted sum. A key bias
  adds q·b_k to every score of a query, which softmax ignores; a value bias passes through the
  weighted sum unchanged (the weights sum to one), so it is added after W_UV.

Attention is plain eager math on the mask transformers builds for ``eager`` (additive float) or
``sdpa`` (boolean, or None for a purely causal batch), which also allows the absorbed path's
value size (the latent) to differ from its query/key size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dim: [x1, x2] -> [-x2, x1] (transformers' RoPE layout)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (its last dim laid out as [first halves | second halves] of the pairs) by cos/sin."""
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, n_kv, S, d) -> (B, n_kv * groups, S, d): each KV head serves ``groups`` query heads (GQA)."""
    if groups == 1:
        return x
    b, n_kv, s, d = x.shape
    return x[:, :, None].expand(b, n_kv, groups, s, d).reshape(b, n_kv * groups, s, d)


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention on (B, H, T, d) tensors with a transformers mask; returns (output, weights).

    The mask is what ``create_causal_mask`` gives eager (additive float) or sdpa (boolean, True =
    attend). sdpa gets None when the batch is purely causal, so None means causal, aligned to the
    end of the keys (the queries are the last T of S positions).
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    t, s = query.shape[-2], key.shape[-2]
    if attention_mask is None:
        if t > 1:
            causal = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(diagonal=s - t)
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout > 0.0:
        weights = nn.functional.dropout(weights, p=dropout, training=True)
    return torch.matmul(weights, value), weights


class MLACache(DynamicCache):
    """A generation cache that holds only [c_KV; k_rope] per token per layer.

    Each layer's "keys" slot holds the latent c_KV, shape (B, 1, S, kv_lora_rank), and its
    "values" slot the already rotated RoPE keys, shape (B, num_kv_heads, S, rope_dim). Reusing
    ``DynamicLayer`` keeps everything ``generate`` relies on (sequence length, mask sizes, beam
    reordering, cropping) working unchanged. Pass it as ``model.generate(...,
    past_key_values=MLACache())``; without it, transformers' default ``DynamicCache`` stores the
    same latent tensors, since ``MLAAttention`` decides what is cached.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Accept and ignore DynamicCache's arguments (e.g. config=): one plain full-length layer
        # per model layer, created on first use.
        super(DynamicCache, self).__init__(layer_class_to_replicate=DynamicLayer)

    def stored_numel_per_token(self, layer_idx: int | None = None) -> int:
        """Numbers stored per token (per sequence) in one layer, or summed over layers when ``layer_idx`` is None."""
        layers = self.layers if layer_idx is None else [self.layers[layer_idx]]
        total = 0
        for layer in layers:
            if not layer.is_initialized or layer.keys.numel() == 0:
                continue
            total += layer.keys.shape[1] * layer.keys.shape[-1] + layer.values.shape[1] * layer.values.shape[-1]
        return total

    def nbytes(self) -> int:
        """Bytes held by all cached tensors (every sequence, every layer)."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total


class MLAAttention(nn.Module):
    """Multi-head latent attention with per-head decoupled RoPE, a drop-in for a stock ``self_attn``.

    Parameters: ``q_proj`` and ``o_proj`` as in the original model (q rows permuted per head to
    [NoPE | RoPE]); ``kv_down_proj`` (hidden -> kv_lora_rank, the cached latent); ``k_up_proj``
    (latent -> num_kv_heads * (head_dim - rope_dim), absent when every dim is RoPE'd);
    ``v_up_proj`` (latent -> num_kv_heads * head_dim); ``k_rope_proj`` (hidden -> num_kv_heads
    * rope_dim). Original k/v biases stay exact as constants added after the up-projections
    (a bias cannot pass through the latent). ``rope_pairs[g]`` are the frequency pairs KV head g
    (and its query heads) keep rotating.
    """

    def __init__(
        self,
        config: Any,
        layer_idx: int,
        kv_lora_rank: int,
        rope_pairs: torch.Tensor,
        q_bias: bool = False,
        k_bias: bool = False,
        v_bias: bool = False,
        o_bias: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = 2 * rope_pairs.shape[1]
        self.nope_dim = self.head_dim - self.rope_dim
        self.scaling = self.head_dim**-0.5  # the original head size: the scores must not change
        self.attention_dropout = getattr(config, "attention_dropout", 0.0)
        self.is_causal = True
        self.absorb = False
        self.register_buffer("rope_pairs", rope_pairs.to(torch.long).clone(), persistent=False)

        n_h, n_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(self.hidden_size, n_h * d, bias=q_bias)
        self.kv_down_proj = nn.Linear(self.hidden_size, kv_lora_rank, bias=False)
        self.k_up_proj = nn.Linear(kv_lora_rank, n_kv * self.nope_dim, bias=k_bias) if self.nope_dim else None
        self.v_up_proj = nn.Linear(kv_lora_rank, n_kv * d, bias=v_bias)
        self.k_rope_proj = nn.Linear(self.hidden_size, n_kv * self.rope_dim, bias=k_bias)
        self.o_proj = nn.Linear(n_h * d, self.hidden_size, bias=o_bias)

    def rope_cos_sin(self, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the model's rotary module (B, T, head_dim), cut to each KV head's pairs: (B, n_kv, T, rope_dim).

        Taking them from ``position_embeddings`` keeps whatever scaling (YaRN, linear, ...) the
        model's rotary module applies.
        """
        cos, sin = position_embeddings
        half = self.head_dim // 2
        # (B, T, half)[..., (n_kv, r/2)] -> (B, T, n_kv, r/2) -> (B, n_kv, T, r/2)
        cos = cos[..., :half][..., self.rope_pairs].transpose(1, 2)
        sin = sin[..., :half][..., self.rope_pairs].transpose(1, 2)
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention output (B, T, hidden) and weights, as the stock attention returns them."""
        b, t, _ = hidden_states.shape
        n_h, n_kv, d, r = self.num_heads, self.num_kv_heads, self.head_dim, self.rope_dim

        cos, sin = self.rope_cos_sin(position_embeddings)
        q = self.q_proj(hidden_states).view(b, t, n_h, d).transpose(1, 2)
        q_nope = q[..., : self.nope_dim]
        q_rope = apply_rope(
            q[..., self.nope_dim :],
            repeat_kv(cos, self.num_key_value_groups),
            repeat_kv(sin, self.num_key_value_groups),
        )

        latent = self.kv_down_proj(hidden_states).unsqueeze(1)  # (B, 1, T, R)
        k_rope = apply_rope(self.k_rope_proj(hidden_states).view(b, t, n_kv, r).transpose(1, 2), cos, sin)
        if past_key_values is not None:
            latent, k_rope = past_key_values.update(latent, k_rope, self.layer_idx)

        dropout = self.attention_dropout if self.training else 0.0
        if self.absorb:
            out, weights = self._attend_absorbed(q_nope, q_rope, latent, k_rope, attention_mask, dropout)
        else:
            out, weights = self._attend_plain(q_nope, q_rope, latent, k_rope, attention_mask, dropout)
        out = out.transpose(1, 2).reshape(b, t, n_h * d)
        return self.o_proj(out), weights

    def _attend_plain(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Up-project the latents to keys and values, then ordinary (GQA) attention."""
        b, _, s, _ = latent.shape
        n_kv, d = self.num_kv_heads, self.head_dim
        c = latent[:, 0]  # (B, S, R)
        keys = k_rope
        if self.k_up_proj is not None:
            k_nope = self.k_up_proj(c).view(b, s, n_kv, self.nope_dim).transpose(1, 2)
            keys = torch.cat((k_nope, k_rope), dim=-1)
        values = self.v_up_proj(c).view(b, s, n_kv, d).transpose(1, 2)
        query = torch.cat((q_nope, q_rope), dim=-1)
        groups = self.num_key_value_groups
        return attend(query, repeat_kv(keys, groups), repeat_kv(values, groups), attention_mask, self.scaling, dropout)

    def _attend_absorbed(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend over the latents: W_UK folded into the query, W_UV applied after the weighted sum."""
        b, n_h, t, _ = q_nope.shape
        _, _, s, rank = latent.shape
        n_kv, groups, d = self.num_kv_heads, self.num_key_value_groups, self.head_dim

        query, keys = q_rope, k_rope
        if self.k_up_proj is not None:
            w_uk = self.k_up_proj.weight.view(n_kv, self.nope_dim, rank)
            q_latent = torch.einsum("bgjtn,gnr->bgjtr", q_nope.reshape(b, n_kv, groups, t, self.nope_dim), w_uk)
            query = torch.cat((q_latent.reshape(b, n_h, t, rank), q_rope), dim=-1)
            keys = torch.cat((latent.expand(b, n_kv, s, rank), k_rope), dim=-1)
        out_latent, weights = attend(
            query, repeat_kv(keys, groups), latent.expand(b, n_h, s, rank), attention_mask, self.scaling, dropout
        )
        w_uv = self.v_up_proj.weight.view(n_kv, d, rank)
        out = torch.einsum("bgjtr,gdr->bgjtd", out_latent.reshape(b, n_kv, groups, t, rank), w_uv)
        if self.v_up_proj.bias is not None:
            out = out + self.v_up_proj.bias.view(1, n_kv, 1, 1, d)
        return out.reshape(b, n_h, t, d), weights
