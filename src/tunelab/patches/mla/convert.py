"""Convert MHA/GQA attention into multi-head latent attention (seed 004 §6; MHA2MLA; TransMLA).

MLA caches a small latent per token instead of full keys and values. A trained Llama-family
model is converted in three steps, per layer:

1. **Partial RoPE** (MHA2MLA, Ji et al. 2025). Of the head_dim/2 rotary frequency pairs, each
   KV head keeps ``rope_dim/2`` rotating; the rest become position-free (NoPE) dims, which is
   what lets them be compressed. Pair i rotates dims i and i + head_dim/2 at frequency
   θ^(-2i/head_dim), so pair 0 is the highest frequency. Choices: ``high`` (the highest
   frequencies), ``low`` (the lowest), ``uniform`` (evenly spaced, starting at the highest),
   ``2-norm`` (per layer and KV head, the pairs with the largest mean |q_pair|·|k_pair| on
   calibration tokens, query norms summed over the heads of the group; a rotation does not
   change a pair's norm, so it is measured before RoPE). The query heads of a group rotate
   exactly the pairs of their KV head.
2. **Low-rank K/V.** The NoPE key rows and all value rows are factored through one latent
   c_KV = W_down h of size ``kv_lora_rank``, with per-head up-projections W_UK, W_UV.
   ``joint`` takes one truncated SVD of [W_k_nope; W_v] (MHA2MLA); ``split`` factors them
   separately with the rank split in proportion to their row counts. The singular values are
   shared as sqrt(S) between the two factors, which keeps both at a similar scale for healing.
   By Eckart-Young, joint SVD is the best rank-R fit of the stacked weights. Biases (Qwen2)
   stay exact as constants after the up-projection.
3. **Decoupled RoPE key.** ``per-head`` (MHA2MLA): each KV head keeps its own ``rope_dim``
   RoPE'd key dims computed straight from the hidden state. ``shared`` (DeepSeek): one RoPE key
   of ``rope_dim`` dims for all heads, built as TransMLA does by mixing the KV heads per
   frequency. All heads rotate a kept pair f by the same angle, so any mix across heads
   commutes with RoPE: with u_f the top eigenvector of the (num_kv_heads x num_kv_heads)
   second-moment matrix of the pair's keys (measured on calibration tokens, or from the
   weights when there are none), the shared key is k'_f = Σ_g u_f[g] k_{g,f} and each query
   head of KV head g reads it with its pair scaled by u_f[g]. What the shared key does not
   carry, k_{g,f} - u_f[g] k'_f, joins the NoPE key (so the NoPE part is all head_dim dims) and
   loses its rotation: ``shared`` is exact with one KV head, or at position offset 0, and an
   approximation otherwise that healing recovers. The same pairs rotate for every head:
   ``high``/``low``/``uniform`` as above, ``2-norm`` on the scores summed over KV heads.
4. **Latent norm** (``latent_norm``): DeepSeek-V3 always RMS-normalises the latent before the
   up-projections. Conversion can add that norm (needed for ``tunelab export deepseek``), its
   weight set to the latent's root-mean-square on calibration tokens (or, without them, the
   value for isotropic unit-RMS inputs scaled by the layer's input norm), so the normalised
   latent starts close to the plain one. It makes the model inexact at any rank; heal it.

At full rank (the rank of [W_k_nope; W_v], at most ``2 * num_kv_heads * head_dim``) with
``rope_dim = head_dim``, per-head RoPE key and no latent norm, the converted model computes the
original function. A rank beyond what the SVD provides is padded with zero directions, exact
but wasteful.

Conversion parameters go in ``config.mla``; ``model.save_pretrained`` then writes a normal
safetensors checkpoint and ``load_mla_model`` rebuilds it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.patches.mla.attention import MLAAttention, MLACache
from tunelab.patches.mla.block import MLA_ATTENTION, SUPPORTED_MODEL_TYPES, Keys, MlaPatch
from tunelab.patches.mla.block import head_dim as _head_dim
from tunelab.patches.mla.calibration import calibration_token_ids

__all__ = [
    "MLAAttention",
    "MLACache",
    "SUPPORTED_MODEL_TYPES",
    "convert_to_mla",
    "kv_cache_bytes_per_token",
    "load_mla_model",
    "reconstruction_error",
    "select_rope_pairs",
    "set_absorbed",
]

PARTIAL_ROPE_CHOICES = ("high", "low", "uniform", "2-norm")
SVD_CHOICES = ("joint", "split")
ROPE_KEY_CHOICES = ("per-head", "shared")
MLA_FORMAT_VERSION = 1


def _layers(model: Any) -> Any:
    """The decoder layers of a Llama-style causal LM (``model.model.layers``)."""
    return model.model.layers


def _check_arguments(
    model: Any,
    kv_lora_rank: int,
    rope_dim: int,
    partial_rope: str,
    svd: str,
    rope_key: str,
    calibration_ids: torch.Tensor | None,
) -> None:
    """Refuse bad arguments before touching any weight, each with the fix."""
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"MLA conversion supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
            f"got {getattr(config, 'model_type', None)!r}"
        )
    if getattr(config, "mla", None):
        raise ValueError("this model is already converted to MLA (config.mla is set)")
    if config._attn_implementation not in MLA_ATTENTION:
        raise ValueError(
            f"MLA attention reads eager or sdpa attention masks; the model uses "
            f"{config._attn_implementation!r}: load it with attn_implementation='sdpa'"
        )
    if rope_key not in ROPE_KEY_CHOICES:
        raise ValueError(f"rope_key must be one of {ROPE_KEY_CHOICES}, got {rope_key!r}")
    if partial_rope not in PARTIAL_ROPE_CHOICES:
        raise ValueError(f"partial_rope must be one of {PARTIAL_ROPE_CHOICES}, got {partial_rope!r}")
    if svd not in SVD_CHOICES:
        raise ValueError(f"svd must be one of {SVD_CHOICES}, got {svd!r}")
    head_dim, n_kv = _head_dim(config), config.num_key_value_heads
    if rope_dim % 2 or not 2 <= rope_dim <= head_dim:
        raise ValueError(
            f"rope_dim must be even and between 2 and head_dim={head_dim} (RoPE rotates pairs of dims), got {rope_dim}"
        )
    max_rank = 2 * n_kv * head_dim
    if not 1 <= kv_lora_rank <= max_rank:
        raise ValueError(
            f"kv_lora_rank must be between 1 and 2 * num_kv_heads * head_dim = {max_rank} "
            f"(the original K/V values per token; a larger latent saves nothing), got {kv_lora_rank}"
        )
    if partial_rope == "2-norm" and calibration_ids is None:
        raise ValueError("partial_rope='2-norm' ranks pairs by query/key norms: pass calibration_ids (token ids)")


@torch.no_grad()
def calibration_stats(
    model: Any, calibration_ids: torch.Tensor, second_moment: bool = False, batch_size: int = 8
) -> list[dict[str, torch.Tensor]]:
    """Per layer, statistics of the attention inputs on calibration tokens (the model is not changed).

    ``q_norm`` (num_heads, head_dim/2) and ``k_norm`` (num_kv_heads, head_dim/2): mean pair norms
    |q_pair|, |k_pair| (a rotation does not change them, so they are taken before RoPE);
    ``k_cov`` (head_dim/2, num_kv_heads, num_kv_heads): mean k_{g,f}·k_{h,f} per pair f;
    ``x2`` (hidden, hidden), only with ``second_moment``: mean x xᵀ of the attention input.
    """
    config = model.config
    n_h, n_kv, d = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
    half = d // 2
    sums: list[dict[str, torch.Tensor]] = [{} for _ in _layers(model)]
    counts = [0] * len(sums)

    def accumulate(i: int, attn: Any, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        q = nn.functional.linear(x, attn.q_proj.weight.double(), _double(attn.q_proj.bias)).view(-1, n_h, 2, half)
        k = nn.functional.linear(x, attn.k_proj.weight.double(), _double(attn.k_proj.bias)).view(-1, n_kv, 2, half)
        stats = {
            "q_norm": q.norm(dim=2).sum(0),
            "k_norm": k.norm(dim=2).sum(0),
            "k_cov": torch.einsum("ngcf,nhcf->fgh", k, k),
        }
        if second_moment:
            stats["x2"] = x.T @ x
        for key, value in stats.items():
            sums[i][key] = sums[i][key] + value if key in sums[i] else value
        counts[i] += x.shape[0]

    hooks = []
    for i, layer in enumerate(_layers(model)):
        def grab(_module: Any, args: tuple, i: int = i, attn: Any = layer.self_attn) -> None:
            accumulate(i, attn, args[0].detach())

        hooks.append(layer.self_attn.q_proj.register_forward_pre_hook(grab))
    try:
        for batch in calibration_ids.split(batch_size):
            model(input_ids=batch.to(model.device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [{key: value / n for key, value in layer.items()} for layer, n in zip(sums, counts)]


def _double(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()


def _pair_scores(stats: dict[str, torch.Tensor], groups: int) -> torch.Tensor:
    """(num_kv_heads, head_dim/2) 2-norm scores: Σ over the group's query heads of mean|q_pair|·mean|k_pair|."""
    n_kv, half = stats["k_norm"].shape
    return stats["q_norm"].view(n_kv, groups, half).sum(1) * stats["k_norm"]


def select_rope_pairs(
    model: Any,
    rope_dim: int,
    partial_rope: str = "high",
    calibration_ids: torch.Tensor | None = None,
    rope_key: str = "per-head",
    stats: list[dict[str, torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """The frequency pairs each RoPE key keeps rotating: per layer, a sorted (rope_heads, rope_dim/2) index tensor.

    rope_heads is num_kv_heads (``per-head``) or 1 (``shared``). Pair 0 is the highest frequency
    (transformers' inv_freq = θ^(-2i/head_dim)). ``stats`` (from ``calibration_stats``) saves
    a second calibration pass for ``2-norm``.
    """
    config = model.config
    n_layers, n_kv, half = config.num_hidden_layers, config.num_key_value_heads, _head_dim(config) // 2
    rows = 1 if rope_key == "shared" else n_kv
    keep = rope_dim // 2
    if partial_rope == "2-norm":
        if stats is None:
            if calibration_ids is None:
                raise ValueError("partial_rope='2-norm' ranks pairs by query/key norms: pass calibration_ids (token ids)")
            stats = calibration_stats(model, calibration_ids)
        groups = config.num_attention_heads // n_kv
        scores = [_pair_scores(layer, groups) for layer in stats]
        if rope_key == "shared":
            scores = [score.sum(0, keepdim=True) for score in scores]
        return [score.topk(keep, dim=-1).indices.sort(dim=-1).values for score in scores]
    if partial_rope == "high":
        pairs = torch.arange(keep)
    elif partial_rope == "low":
        pairs = torch.arange(half - keep, half)
    elif partial_rope == "uniform":
        pairs = torch.arange(keep) * half // keep  # floor(k * half / keep): spread from the highest frequency down
    else:
        raise ValueError(f"partial_rope must be one of {PARTIAL_ROPE_CHOICES}, got {partial_rope!r}")
    return [pairs.expand(rows, keep).clone() for _ in range(n_layers)]


def _dim_layout(rope_pairs: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per KV head, the head dims that lose RoPE (ascending) and those that keep it ([first halves | second halves])."""
    half = head_dim // 2
    rope_idx = torch.cat((rope_pairs, rope_pairs + half), dim=-1)
    nope_idx = []
    for g in range(rope_pairs.shape[0]):
        keep = torch.zeros(head_dim, dtype=torch.bool)
        keep[rope_idx[g]] = True
        nope_idx.append(torch.nonzero(~keep).flatten())
    return torch.stack(nope_idx), rope_idx


def _truncated_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W (rows, in) ≈ up @ down with down (rank, in), up (rows, rank): truncated SVD, sqrt(S) on each side.

    Directions beyond the matrix's size are zero, so a rank above it is exact.
    """
    rows, cols = weight.shape
    down = weight.new_zeros(rank, cols)
    up = weight.new_zeros(rows, rank)
    if rows == 0 or rank == 0:
        return down, up
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    down[:k] = root[:, None] * vh[:k]
    up[:, :k] = u[:, :k] * root
    return down, up


def factor_kv(
    w_k_nope: torch.Tensor, w_v: torch.Tensor, rank: int, svd: str = "joint"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factor the NoPE key and value weights through one latent: returns (W_down, W_UK, W_UV).

    ``joint``: one SVD of [W_k_nope; W_v]. ``split``: separate SVDs, the rank divided in
    proportion to the rows of each; W_UK then reads only the key part of the latent and W_UV
    only the value part. Computed in float64.
    """
    w_k_nope, w_v = w_k_nope.double(), w_v.double()
    rows_k, rows_v = w_k_nope.shape[0], w_v.shape[0]
    if svd == "joint":
        down, up = _truncated_factors(torch.cat((w_k_nope, w_v)), rank)
        return down, up[:rows_k], up[rows_k:]
    if svd != "split":
        raise ValueError(f"svd must be one of {SVD_CHOICES}, got {svd!r}")
    rank_k = round(rank * rows_k / (rows_k + rows_v))
    if rows_k and rank > 1:
        rank_k = min(max(rank_k, 1), rank - 1)
    rank_v = rank - rank_k
    down_k, up_k = _truncated_factors(w_k_nope, rank_k)
    down_v, up_v = _truncated_factors(w_v, rank_v)
    down = torch.cat((down_k, down_v))
    w_uk = torch.cat((up_k, up_k.new_zeros(rows_k, rank_v)), dim=1)
    w_uv = torch.cat((up_v.new_zeros(rows_v, rank_k), up_v), dim=1)
    return down, w_uk, w_uv


def _new_mla_module(config: Any, layer_idx: int, spec: Mapping[str, Any], like: Any) -> MLAAttention:
    """An MLA module of the shapes ``spec`` describes, on the device and dtype of the module it replaces."""
    module = MLAAttention(
        config,
        layer_idx,
        kv_lora_rank=spec["kv_lora_rank"],
        rope_pairs=torch.tensor(spec["rope_pairs"][layer_idx], dtype=torch.long),
        q_bias=spec["q_bias"],
        k_bias=spec["k_bias"],
        v_bias=spec["v_bias"],
        o_bias=spec["o_bias"],
        rope_key=spec.get("rope_key", "per-head"),
        latent_norm=spec.get("latent_norm", False),
    )
    weight = like.q_proj.weight
    return module.to(device=weight.device, dtype=weight.dtype)


def shared_rope_mix(k_cov: torch.Tensor) -> torch.Tensor:
    """Per pair, the unit mix of KV heads carrying the most key energy: (pairs, n_kv, n_kv) -> (pairs, n_kv).

    The top eigenvector of each pair's second-moment matrix across heads, its sign fixed so that
    its entries sum to a non-negative number (deterministic).
    """
    _, vectors = torch.linalg.eigh(k_cov.double())
    u = vectors[..., -1]
    return u * torch.where(u.sum(-1, keepdim=True) < 0, -1.0, 1.0).to(u)


def _weight_k_cov(attn: Any, n_kv: int, head_dim: int) -> torch.Tensor:
    """The keys' per-pair second moment across heads for isotropic unit inputs (no calibration data)."""
    half = head_dim // 2
    w = attn.k_proj.weight.double().view(n_kv, 2, half, -1)
    cov = torch.einsum("gcfi,hcfi->fgh", w, w)
    if attn.k_proj.bias is not None:
        b = attn.k_proj.bias.double().view(n_kv, 2, half)
        cov = cov + torch.einsum("gcf,hcf->fgh", b, b)
    return cov


def _split_shared_rope(
    w: torch.Tensor, pairs: torch.Tensor, mix: torch.Tensor, n_kv: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split key rows (or a bias) into the shared RoPE key and the per-head residual.

    ``w``: (n_kv * head_dim, ...) key rows; ``pairs`` (P,) kept pairs; ``mix`` (P, n_kv).
    Returns the shared key rows (2P, ...) laid out [first halves | second halves] and the
    residual rows (n_kv * head_dim, ...), w with u_f[g]·k'_f taken out of each kept pair.
    """
    half = head_dim // 2
    rows = w.view(n_kv, head_dim, *w.shape[1:])
    dims = torch.cat((pairs, pairs + half))  # (2P,)
    u = torch.cat((mix, mix)).T.to(w)  # (n_kv, 2P)
    extra = (None,) * (w.dim() - 1)
    picked = rows[:, dims]  # (n_kv, 2P, ...)
    shared = (u[(...,) + extra] * picked).sum(0)  # (2P, ...)
    residual = rows.clone()
    residual[:, dims] = picked - u[(...,) + extra] * shared
    return shared, residual.reshape(w.shape)


def _shared_query_rows(w: torch.Tensor, pairs: torch.Tensor, mix: torch.Tensor, n_h: int, groups: int,
                       head_dim: int) -> torch.Tensor:
    """Query rows (or bias) for a shared RoPE key: per head [all head_dim dims | u_f[g]·(kept pair dims)]."""
    half = head_dim // 2
    rows = w.view(n_h, head_dim, *w.shape[1:])
    dims = torch.cat((pairs, pairs + half))
    u = torch.cat((mix, mix)).T.to(w)  # (n_kv, 2P)
    u_heads = u.repeat_interleave(groups, dim=0)  # (n_h, 2P)
    extra = (None,) * (w.dim() - 1)
    rope = u_heads[(...,) + extra] * rows[:, dims]
    return torch.cat((rows, rope), dim=1).reshape(n_h * (head_dim + dims.shape[0]), *w.shape[1:])


@torch.no_grad()
def _convert_layer(
    attn: Any, config: Any, layer_idx: int, spec: Mapping[str, Any], mix: torch.Tensor | None = None
) -> MLAAttention:
    """Build the MLA module of one layer from its stock attention (the SVD happens here).

    ``mix`` (P, n_kv): the shared RoPE key's mix of KV heads per kept pair (``rope_key='shared'``).
    """
    n_h, n_kv, d = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
    groups = n_h // n_kv
    pairs = torch.tensor(spec["rope_pairs"][layer_idx], dtype=torch.long)
    w_q, b_q = attn.q_proj.weight, attn.q_proj.bias
    w_k, b_k = attn.k_proj.weight, attn.k_proj.bias
    if spec.get("rope_key", "per-head") == "shared":
        assert mix is not None
        k_rope_w, k_nope_w = _split_shared_rope(w_k.double(), pairs[0], mix, n_kv, d)
        q_w = _shared_query_rows(w_q.double(), pairs[0], mix, n_h, groups, d)
        if b_k is not None:
            k_rope_b, k_nope_b = _split_shared_rope(b_k.double(), pairs[0], mix, n_kv, d)
        if b_q is not None:
            q_b = _shared_query_rows(b_q.double(), pairs[0], mix, n_h, groups, d)
    else:
        nope_idx, rope_idx = _dim_layout(pairs, d)
        head_order = torch.cat((nope_idx, rope_idx), dim=-1)  # (n_kv, d): [NoPE | RoPE] per KV head
        q_rows = torch.cat([head_order[h // groups] + h * d for h in range(n_h)])
        k_nope_rows = torch.cat([nope_idx[g] + g * d for g in range(n_kv)])
        k_rope_rows = torch.cat([rope_idx[g] + g * d for g in range(n_kv)])
        q_w, k_rope_w, k_nope_w = w_q[q_rows], w_k[k_rope_rows], w_k[k_nope_rows]
        if b_k is not None:
            k_rope_b, k_nope_b = b_k[k_rope_rows], b_k[k_nope_rows]
        if b_q is not None:
            q_b = b_q[q_rows]

    down, w_uk, w_uv = factor_kv(k_nope_w, attn.v_proj.weight, spec["kv_lora_rank"], spec["svd"])

    new = _new_mla_module(config, layer_idx, spec, attn)
    dtype = new.q_proj.weight.dtype
    new.q_proj.weight.copy_(q_w.to(dtype))
    if b_q is not None:
        new.q_proj.bias.copy_(q_b.to(dtype))
    new.o_proj.weight.copy_(attn.o_proj.weight)
    if attn.o_proj.bias is not None:
        new.o_proj.bias.copy_(attn.o_proj.bias)
    new.kv_down_proj.weight.copy_(down.to(dtype))
    new.v_up_proj.weight.copy_(w_uv.to(dtype))
    new.k_rope_proj.weight.copy_(k_rope_w.to(dtype))
    if new.k_up_proj is not None:
        new.k_up_proj.weight.copy_(w_uk.to(dtype))
    if b_k is not None:
        new.k_rope_proj.bias.copy_(k_rope_b.to(dtype))
        if new.k_up_proj is not None:
            new.k_up_proj.bias.copy_(k_nope_b.to(dtype))
    if attn.v_proj.bias is not None:
        new.v_up_proj.bias.copy_(attn.v_proj.bias)
    new.train(attn.training)
    return new


@torch.no_grad()
def _latent_rms(new: MLAAttention, input_norm: Any, x2: torch.Tensor | None) -> float:
    """The latent's root-mean-square: from the inputs' second moment when measured, else for isotropic inputs.

    Without calibration the attention input is taken as a unit-RMS vector scaled by the layer's
    input RMSNorm weight γ, so E[x xᵀ] ≈ diag(γ²).
    """
    down = new.kv_down_proj.weight.double()
    if x2 is None:
        gamma2 = torch.ones(down.shape[1], dtype=torch.float64, device=down.device)
        if input_norm is not None and getattr(input_norm, "weight", None) is not None:
            gamma2 = input_norm.weight.double() ** 2
        energy = (down.pow(2) * gamma2).sum()
    else:
        energy = torch.einsum("ri,ij,rj->", down, x2.to(down), down)
    return float((energy / down.shape[0]).sqrt())


@torch.no_grad()
def convert_to_mla(
    model: Any,
    kv_lora_rank: int,
    rope_dim: int,
    partial_rope: str = "high",
    svd: str = "joint",
    rope_key: str = "per-head",
    calibration_ids: torch.Tensor | None = None,
    latent_norm: bool = False,
) -> nn.Module:
    """Convert every attention layer of a Llama/Qwen2/Mistral model to MLA, in place; returns the model.

    ``kv_lora_rank``: size of the cached latent c_KV per token per layer. ``rope_dim``: RoPE'd
    dims per RoPE key (even, at most head_dim): per KV head (``per-head``) or in all
    (``shared``). ``calibration_ids``: token ids (B, T); needed by ``partial_rope='2-norm'``,
    used when given by ``shared`` (the head mix) and ``latent_norm`` (the norm's scale). The
    parameters are recorded in ``model.config.mla``.
    """
    _check_arguments(model, kv_lora_rank, rope_dim, partial_rope, svd, rope_key, calibration_ids)
    config = model.config
    n_kv, d = config.num_key_value_heads, _head_dim(config)
    stats = None
    if calibration_ids is not None and (partial_rope == "2-norm" or rope_key == "shared" or latent_norm):
        stats = calibration_stats(model, calibration_ids, second_moment=latent_norm)
    pairs = select_rope_pairs(model, rope_dim, partial_rope, calibration_ids, rope_key, stats)
    first = _layers(model)[0].self_attn
    spec: dict[str, Any] = {
        "format_version": MLA_FORMAT_VERSION,
        "kv_lora_rank": kv_lora_rank,
        "rope_dim": rope_dim,
        "partial_rope": partial_rope,
        "svd": svd,
        "rope_key": rope_key,
        "latent_norm": latent_norm,
        "q_bias": first.q_proj.bias is not None,
        "k_bias": first.k_proj.bias is not None,
        "v_bias": first.v_proj.bias is not None,
        "o_bias": first.o_proj.bias is not None,
        "rope_pairs": [p.tolist() for p in pairs],
    }
    mixes: list[torch.Tensor | None] = [None] * len(pairs)
    if rope_key == "shared":
        for i, layer in enumerate(_layers(model)):
            cov = stats[i]["k_cov"] if stats is not None else _weight_k_cov(layer.self_attn, n_kv, d)
            mixes[i] = shared_rope_mix(cov[pairs[i][0]])
        spec["rope_mix"] = [m.tolist() for m in mixes if m is not None]  # what reconstruction_error needs to undo the split
    for i, layer in enumerate(_layers(model)):
        new = _convert_layer(layer.self_attn, config, i, spec, mixes[i])
        if new.kv_norm is not None:
            x2 = stats[i]["x2"] if stats is not None else None
            new.kv_norm.weight.fill_(_latent_rms(new, getattr(layer, "input_layernorm", None), x2))
        layer.self_attn = new
    config.mla = spec
    return model


def set_absorbed(model: Any, absorb: bool = True) -> nn.Module:
    """Switch every MLA layer between the plain path and the absorbed (W_UK/W_UV folded) path."""
    for module in model.modules():
        if isinstance(module, MLAAttention):
            module.absorb = absorb
    return model


@torch.no_grad()
def reconstruction_error(original_model: Any, converted_model: Any) -> float:
    """Relative Frobenius error of the low-rank [W_k_nope; W_v] over all layers: ||M - W_up W_down|| / ||M||.

    Measures only the compression (step 2), not the change of function from partial RoPE. With
    a shared RoPE key, M holds the residual NoPE key (the kept pairs less the shared key's part).
    """
    config = converted_model.config
    d = _head_dim(config)
    err2 = norm2 = 0.0
    for orig, conv in zip(_layers(original_model), _layers(converted_model)):
        attn, mla = orig.self_attn, conv.self_attn
        if not isinstance(mla, MLAAttention):
            raise ValueError("converted_model has a layer that is not MLAAttention: convert it with convert_to_mla")
        w_k = attn.k_proj.weight.double()
        if mla.shared_rope:
            mix = torch.tensor(config.mla["rope_mix"][mla.layer_idx], dtype=torch.float64, device=w_k.device)
            _, k_nope = _split_shared_rope(w_k, mla.rope_pairs[0].to(w_k.device), mix, config.num_key_value_heads, d)
        else:
            nope_idx, _ = _dim_layout(mla.rope_pairs.cpu(), d)
            rows = torch.cat([nope_idx[g] + g * d for g in range(nope_idx.shape[0])])
            k_nope = w_k[rows.to(w_k.device)]
        target = torch.cat((k_nope, attn.v_proj.weight.double()))
        ups = [mla.v_up_proj.weight] if mla.k_up_proj is None else [mla.k_up_proj.weight, mla.v_up_proj.weight]
        approx = torch.cat(ups).double() @ mla.kv_down_proj.weight.double()
        err2 += (target - approx).pow(2).sum().item()
        norm2 += target.pow(2).sum().item()
    return (err2 / norm2) ** 0.5


def kv_cache_bytes_per_token(config_or_dims: Any, dtype_bytes: int = 2, original: bool = False) -> int:
    """KV-cache bytes per token over all layers, of the original model or of its MLA conversion.

    ``original=True`` gives the full K/V size of the geometry even when it carries an MLA block.

    Original: 2·layers·kv_heads·head_dim·bytes. MLA: layers·(kv_lora_rank + kv_heads·rope_dim)·bytes
    with a per-head RoPE key, layers·(kv_lora_rank + rope_dim)·bytes with a shared one.

    Takes a transformers config (MLA when it carries ``config.mla``) or a mapping with
    ``num_hidden_layers``, ``num_key_value_heads``, ``head_dim`` (or ``hidden_size`` and
    ``num_attention_heads``) and, for MLA, ``kv_lora_rank`` and ``rope_dim`` (per KV head).
    """
    if isinstance(config_or_dims, Mapping):
        dims = dict(config_or_dims)
        mla = dims if "kv_lora_rank" in dims else dims.get("mla")
    else:
        c = config_or_dims
        dims = {
            "num_hidden_layers": c.num_hidden_layers,
            "num_key_value_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            "head_dim": _head_dim(c),
        }
        mla = getattr(c, "mla", None)
    layers = dims["num_hidden_layers"]
    n_kv = dims.get("num_key_value_heads") or dims["num_attention_heads"]
    head_dim = dims.get("head_dim") or dims["hidden_size"] // dims["num_attention_heads"]
    if mla and not original:
        rope_heads = 1 if mla.get("rope_key", "per-head") == "shared" else n_kv
        return layers * (mla["kv_lora_rank"] + rope_heads * mla["rope_dim"]) * dtype_bytes
    return 2 * layers * n_kv * head_dim * dtype_bytes


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint, single file or sharded."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(path / shard)))
        return state
    return load_file(str(path / "model.safetensors"))


def load_mla_model(path: str | Path, attn_implementation: str = "sdpa") -> nn.Module:
    """Load a model saved after ``convert_to_mla`` (``save_pretrained``): stock architecture, MLA layers, saved weights.

    The MLA modules are built with the shapes in ``config.mla`` (no SVD) before the weights load.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    spec = getattr(config, "mla", None)
    if not spec:
        raise ValueError(f"{path} has no 'mla' block in config.json: it was not converted with convert_to_mla")
    if spec.get("format_version") != MLA_FORMAT_VERSION:
        raise ValueError(f"unknown MLA format_version {spec.get('format_version')!r} (expected {MLA_FORMAT_VERSION})")
    config.mla = None  # the stock model must be built first
    dtype = getattr(config, "dtype", None)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    for i, layer in enumerate(_layers(model)):
        layer.self_attn = _new_mla_module(config, i, spec, layer.self_attn)
    config.mla = spec

    state = _read_state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"checkpoint does not match the MLA model: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def apply_mla(model: Any, spec: MlaPatch, tokenizer: Any = None, key: Keys | None = None) -> dict[str, Any]:
    """Convert a loaded model's attention to MLA in place; returns a record (ranks, KV-cache bytes per token).

    Calibration tokens are read (and the data errors raised) before any weight changes.
    """
    calibration = None
    if spec.calibration_data:
        if tokenizer is None:
            raise ValueError("the mla patch reads calibration_data: apply it with the model's tokenizer")
        calibration = torch.tensor(calibration_token_ids(spec, tokenizer, key), dtype=torch.long)
    dtype_bytes = next(model.parameters()).element_size()
    before = kv_cache_bytes_per_token(model.config, dtype_bytes)
    convert_to_mla(model, kv_lora_rank=spec.kv_lora_rank, rope_dim=spec.rope_dim, partial_rope=spec.partial_rope,
                   svd=spec.svd, rope_key=spec.rope_key, calibration_ids=calibration, latent_norm=spec.latent_norm)
    after = kv_cache_bytes_per_token(model.config, dtype_bytes)
    return {"kv_lora_rank": spec.kv_lora_rank, "rope_dim": spec.rope_dim, "partial_rope": spec.partial_rope,
            "svd": spec.svd, "rope_key": spec.rope_key, "latent_norm": spec.latent_norm,
            "calibration_tokens": 0 if calibration is None else calibration.numel(),
            "kv_cache_bytes_per_token_before": before, "kv_cache_bytes_per_token_after": after,
            "kv_cache_reduction": f"{100 * (1 - after / before):.1f}%"}
