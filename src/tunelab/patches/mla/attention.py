"""Multi-head latent attention (MLA) for converted Llama/Qwen2/Mistral layers, and its latent-only cache.

``MLAAttention`` replaces a stock ``self_attn`` inside the stock decoder layer: same call, same
returns. Per token it computes a latent c_KV = W_down h (shared by all heads; optionally
RMS-normalised, as DeepSeek does) and a decoupled RoPE key straight from h: ``per-head``
(MHA2MLA: each KV head has its own ``rope_dim`` RoPE'd dims) or ``shared`` (DeepSeek: one RoPE
key of ``rope_dim`` dims for all heads). Only [c_KV; k_rope] goes into the cache; the non-RoPE
keys and all values are recomputed from the latent with per-head up-projections (W_UK, W_UV).
So the cache holds ``kv_lora_rank + num_kv_heads * rope_dim`` (per-head) or
``kv_lora_rank + rope_dim`` (shared) numbers per token per layer instead of
``2 * num_kv_heads * head_dim``.

Layout: every query head's output of ``q_proj`` is ordered [NoPE dims | RoPE dims] (conversion
permutes the rows once), and the RoPE dims are [first halves of the kept pairs | second halves],
so transformers' ``rotate_half`` convention applies to them unchanged. The query of a head uses
RoPE on exactly the frequency pairs its RoPE key keeps. Per-head: the NoPE dims are the head's
other ``head_dim - rope_dim`` dims. Shared: the NoPE part is all ``head_dim`` dims (the part of
the kept pairs that the shared key does not carry is position-free there).

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
    "values" slot the already rotated RoPE keys, shape (B, num_kv_heads, S, rope_dim) with a
    per-head RoPE key or (B, 1, S, rope_dim) with a shared one. Reusing
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
        layers: list[Any] = list(self.layers) if layer_idx is None else [self.layers[layer_idx]]
        total = 0
        for layer in layers:
            if not layer.is_initialized or layer.keys.numel() == 0:
                continue
            total += layer.keys.shape[1] * layer.keys.shape[-1] + layer.values.shape[1] * layer.values.shape[-1]
        return total

    def nbytes(self) -> int:
        """Bytes held by all cached tensors (every sequence, every layer)."""
        total = 0
        layers: list[Any] = list(self.layers)
        for layer in layers:
            if layer.is_initialized:
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total


class LatentRMSNorm(nn.Module):
    """RMSNorm of the latent, computed as DeepSeek-V3's ``kv_a_layernorm`` (fp32 statistics, eps 1e-6)."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLAAttention(nn.Module):
    """Multi-head latent attention with a decoupled RoPE key, a drop-in for a stock ``self_attn``.

    Parameters: ``q_proj`` and ``o_proj`` as in the original model (q rows permuted per head to
    [NoPE | RoPE]); ``kv_down_proj`` (hidden -> kv_lora_rank, the cached latent); ``kv_norm``
    (RMSNorm of the latent, only with ``latent_norm``); ``k_up_proj`` (latent -> num_kv_heads *
    nope_dim, absent when nope_dim is 0); ``v_up_proj`` (latent -> num_kv_heads * head_dim);
    ``k_rope_proj`` (hidden -> rope_heads * rope_dim, rope_heads = num_kv_heads per-head, 1
    shared). Original k/v biases stay exact as constants added after the up-projections (a bias
    cannot pass through the latent). ``rope_pairs[g]`` are the frequency pairs RoPE key g (and
    the query heads that read it) keep rotating: shape (rope_heads, rope_dim / 2).
    """

    rope_pairs: torch.Tensor  # a buffer: (rope_heads, rope_dim / 2) frequency pair indices

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
        rope_key: str = "per-head",
        latent_norm: bool = False,
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
        self.shared_rope = rope_key == "shared"
        self.rope_heads = 1 if self.shared_rope else self.num_kv_heads
        if rope_pairs.shape[0] != self.rope_heads:
            raise ValueError(f"rope_pairs has {rope_pairs.shape[0]} rows; rope_key={rope_key!r} needs {self.rope_heads}")
        self.rope_dim = 2 * rope_pairs.shape[1]
        self.nope_dim = self.head_dim if self.shared_rope else self.head_dim - self.rope_dim
        self.q_head_dim = self.nope_dim + self.rope_dim
        self.scaling = self.head_dim**-0.5  # the original head size: the scores must not change
        self.attention_dropout = getattr(config, "attention_dropout", 0.0)
        self.is_causal = True
        self.absorb = False
        self.register_buffer("rope_pairs", rope_pairs.to(torch.long).clone(), persistent=False)

        n_h, n_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(self.hidden_size, n_h * self.q_head_dim, bias=q_bias)
        self.kv_down_proj = nn.Linear(self.hidden_size, kv_lora_rank, bias=False)
        self.kv_norm = LatentRMSNorm(kv_lora_rank) if latent_norm else None
        self.k_up_proj = nn.Linear(kv_lora_rank, n_kv * self.nope_dim, bias=k_bias) if self.nope_dim else None
        self.v_up_proj = nn.Linear(kv_lora_rank, n_kv * d, bias=v_bias)
        self.k_rope_proj = nn.Linear(self.hidden_size, self.rope_heads * self.rope_dim, bias=k_bias)
        self.o_proj = nn.Linear(n_h * d, self.hidden_size, bias=o_bias)

    def rope_cos_sin(self, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the model's rotary module (B, T, head_dim), cut to each RoPE key's pairs: (B, rope_heads, T, rope_dim).

        Taking them from ``position_embeddings`` keeps whatever scaling (YaRN, linear, ...) the
        model's rotary module applies.
        """
        cos, sin = position_embeddings
        half = self.head_dim // 2
        # (B, T, half)[..., (rope_heads, r/2)] -> (B, T, rope_heads, r/2) -> (B, rope_heads, T, r/2)
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
        n_h, r = self.num_heads, self.rope_dim

        assert position_embeddings is not None, "MLA attention reads the model's rotary cos/sin"
        cos, sin = self.rope_cos_sin(position_embeddings)
        q = self.q_proj(hidden_states).view(b, t, n_h, self.q_head_dim).transpose(1, 2)
        q_nope = q[..., : self.nope_dim]
        per_query = self.num_heads // self.rope_heads  # query heads reading one RoPE key
        q_rope = apply_rope(q[..., self.nope_dim :], repeat_kv(cos, per_query), repeat_kv(sin, per_query))

        latent = self.kv_down_proj(hidden_states)
        if self.kv_norm is not None:
            latent = self.kv_norm(latent)
        latent = latent.unsqueeze(1)  # (B, 1, T, R)
        k_rope = self.k_rope_proj(hidden_states).view(b, t, self.rope_heads, r).transpose(1, 2)
        k_rope = apply_rope(k_rope, cos, sin)
        if past_key_values is not None:
            latent, k_rope = past_key_values.update(latent, k_rope, self.layer_idx)

        dropout = self.attention_dropout if self.training else 0.0
        attend_latents = self._attend_absorbed if self.absorb else self._attend_plain
        out, weights = attend_latents(q_nope, q_rope, latent, k_rope, attention_mask, dropout)
        out = out.transpose(1, 2).reshape(b, t, n_h * self.head_dim)
        return self.o_proj(out), weights

    def _rope_keys_per_kv_head(self, k_rope: torch.Tensor) -> torch.Tensor:
        """(B, rope_heads, S, r) -> (B, num_kv_heads, S, r): a shared key serves every KV head."""
        b, _, s, r = k_rope.shape
        return k_rope.expand(b, self.num_kv_heads, s, r) if self.shared_rope else k_rope

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
        keys = self._rope_keys_per_kv_head(k_rope)
        if self.k_up_proj is not None:
            k_nope = self.k_up_proj(c).view(b, s, n_kv, self.nope_dim).transpose(1, 2)
            keys = torch.cat((k_nope, keys), dim=-1)
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

        query, keys = q_rope, self._rope_keys_per_kv_head(k_rope)
        if self.k_up_proj is not None:
            w_uk = self.k_up_proj.weight.view(n_kv, self.nope_dim, rank)
            q_latent = torch.einsum("bgjtn,gnr->bgjtr", q_nope.reshape(b, n_kv, groups, t, self.nope_dim), w_uk)
            query = torch.cat((q_latent.reshape(b, n_h, t, rank), q_rope), dim=-1)
            keys = torch.cat((latent.expand(b, n_kv, s, rank), keys), dim=-1)
        out_latent, weights = attend(
            query, repeat_kv(keys, groups), latent.expand(b, n_h, s, rank), attention_mask, self.scaling, dropout
        )
        w_uv = self.v_up_proj.weight.view(n_kv, d, rank)
        out = torch.einsum("bgjtr,gdr->bgjtd", out_latent.reshape(b, n_kv, groups, t, rank), w_uv)
        if self.v_up_proj.bias is not None:
            out = out + self.v_up_proj.bias.view(1, n_kv, 1, 1, d)
        return out.reshape(b, n_h, t, d), weights
