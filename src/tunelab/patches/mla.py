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
3. **Decoupled RoPE key**, ``per-head`` (MHA2MLA): each KV head keeps its own ``rope_dim``
   RoPE'd key dims computed straight from the hidden state. (``shared``, DeepSeek's single RoPE
   key, is not implemented yet.)

At full rank (the rank of [W_k_nope; W_v], at most ``2 * num_kv_heads * head_dim``) with
``rope_dim = head_dim`` the converted model computes the original function. A rank beyond
what the SVD provides is padded with zero directions, exact but wasteful.

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

from tunelab.patches.mla_attention import MLAAttention, MLACache

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

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
PARTIAL_ROPE_CHOICES = ("high", "low", "uniform", "2-norm")
SVD_CHOICES = ("joint", "split")
ROPE_KEY_CHOICES = ("per-head", "shared")
MLA_FORMAT_VERSION = 1


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def _check_arguments(
    model: nn.Module,
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
    if config._attn_implementation not in ("eager", "sdpa"):
        raise ValueError(
            f"MLA attention reads eager or sdpa attention masks; the model uses "
            f"{config._attn_implementation!r}: load it with attn_implementation='sdpa'"
        )
    if rope_key == "shared":
        raise NotImplementedError(
            "rope_key='shared' (DeepSeek's single RoPE key for all heads) is not implemented yet: "
            "use rope_key='per-head'"
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
def _pair_norm_scores(model: nn.Module, calibration_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, (num_kv_heads, head_dim/2) pair scores: Σ over the group's query heads of mean|q_pair|·mean|k_pair|."""
    config = model.config
    n_h, n_kv, d = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
    inputs: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(_layers(model)):
        def grab(_module: nn.Module, args: tuple, i: int = i) -> None:
            inputs[i] = args[0].detach()

        hooks.append(layer.self_attn.q_proj.register_forward_pre_hook(grab))
    try:
        model(input_ids=calibration_ids.to(model.device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()

    scores = []
    for i, layer in enumerate(_layers(model)):
        attn = layer.self_attn
        x = inputs[i].reshape(-1, inputs[i].shape[-1]).float()
        q = nn.functional.linear(
            x, attn.q_proj.weight.float(), None if attn.q_proj.bias is None else attn.q_proj.bias.float()
        ).view(-1, n_h, d)
        k = nn.functional.linear(
            x, attn.k_proj.weight.float(), None if attn.k_proj.bias is None else attn.k_proj.bias.float()
        ).view(-1, n_kv, d)
        half = d // 2
        q_norm = torch.sqrt(q[..., :half] ** 2 + q[..., half:] ** 2).mean(0)  # (n_h, half)
        k_norm = torch.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2).mean(0)  # (n_kv, half)
        q_group = q_norm.view(n_kv, n_h // n_kv, half).sum(1)
        scores.append(q_group * k_norm)
    return scores


def select_rope_pairs(
    model: nn.Module, rope_dim: int, partial_rope: str = "high", calibration_ids: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The frequency pairs each KV head keeps rotating: per layer, a sorted (num_kv_heads, rope_dim/2) index tensor.

    Pair 0 is the highest frequency (transformers' inv_freq = θ^(-2i/head_dim)).
    """
    config = model.config
    n_layers, n_kv, half = config.num_hidden_layers, config.num_key_value_heads, _head_dim(config) // 2
    keep = rope_dim // 2
    if partial_rope == "2-norm":
        if calibration_ids is None:
            raise ValueError("partial_rope='2-norm' ranks pairs by query/key norms: pass calibration_ids (token ids)")
        return [s.topk(keep, dim=-1).indices.sort(dim=-1).values for s in _pair_norm_scores(model, calibration_ids)]
    if partial_rope == "high":
        pairs = torch.arange(keep)
    elif partial_rope == "low":
        pairs = torch.arange(half - keep, half)
    elif partial_rope == "uniform":
        pairs = torch.arange(keep) * half // keep  # floor(k * half / keep): spread from the highest frequency down
    else:
        raise ValueError(f"partial_rope must be one of {PARTIAL_ROPE_CHOICES}, got {partial_rope!r}")
    return [pairs.expand(n_kv, keep).clone() for _ in range(n_layers)]


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


def _new_mla_module(config: Any, layer_idx: int, spec: Mapping[str, Any], like: nn.Module) -> MLAAttention:
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
    )
    weight = like.q_proj.weight
    return module.to(device=weight.device, dtype=weight.dtype)


@torch.no_grad()
def _convert_layer(attn: nn.Module, config: Any, layer_idx: int, spec: Mapping[str, Any]) -> MLAAttention:
    """Build the MLA module of one layer from its stock attention (the SVD happens here)."""
    n_h, n_kv, d = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
    groups = n_h // n_kv
    pairs = torch.tensor(spec["rope_pairs"][layer_idx], dtype=torch.long)
    nope_idx, rope_idx = _dim_layout(pairs, d)
    head_order = torch.cat((nope_idx, rope_idx), dim=-1)  # (n_kv, d): [NoPE | RoPE] per KV head

    q_rows = torch.cat([head_order[h // groups] + h * d for h in range(n_h)])
    k_nope_rows = torch.cat([nope_idx[g] + g * d for g in range(n_kv)])
    k_rope_rows = torch.cat([rope_idx[g] + g * d for g in range(n_kv)])

    w_k, w_v = attn.k_proj.weight, attn.v_proj.weight
    down, w_uk, w_uv = factor_kv(w_k[k_nope_rows], w_v, spec["kv_lora_rank"], spec["svd"])

    new = _new_mla_module(config, layer_idx, spec, attn)
    dtype = new.q_proj.weight.dtype
    new.q_proj.weight.copy_(attn.q_proj.weight[q_rows])
    if attn.q_proj.bias is not None:
        new.q_proj.bias.copy_(attn.q_proj.bias[q_rows])
    new.o_proj.weight.copy_(attn.o_proj.weight)
    if attn.o_proj.bias is not None:
        new.o_proj.bias.copy_(attn.o_proj.bias)
    new.kv_down_proj.weight.copy_(down.to(dtype))
    new.v_up_proj.weight.copy_(w_uv.to(dtype))
    new.k_rope_proj.weight.copy_(w_k[k_rope_rows])
    if new.k_up_proj is not None:
        new.k_up_proj.weight.copy_(w_uk.to(dtype))
    if attn.k_proj.bias is not None:
        new.k_rope_proj.bias.copy_(attn.k_proj.bias[k_rope_rows])
        if new.k_up_proj is not None:
            new.k_up_proj.bias.copy_(attn.k_proj.bias[k_nope_rows])
    if attn.v_proj.bias is not None:
        new.v_up_proj.bias.copy_(attn.v_proj.bias)
    new.train(attn.training)
    return new


def convert_to_mla(
    model: nn.Module,
    kv_lora_rank: int,
    rope_dim: int,
    partial_rope: str = "high",
    svd: str = "joint",
    rope_key: str = "per-head",
    calibration_ids: torch.Tensor | None = None,
) -> nn.Module:
    """Convert every attention layer of a Llama/Qwen2/Mistral model to MLA, in place; returns the model.

    ``kv_lora_rank``: size of the cached latent c_KV per token per layer. ``rope_dim``: RoPE'd
    dims kept per KV head (even, at most head_dim). ``calibration_ids``: token ids (B, T) for
    ``partial_rope='2-norm'``. The parameters are recorded in ``model.config.mla``.
    """
    _check_arguments(model, kv_lora_rank, rope_dim, partial_rope, svd, rope_key, calibration_ids)
    config = model.config
    pairs = select_rope_pairs(model, rope_dim, partial_rope, calibration_ids)
    first = _layers(model)[0].self_attn
    spec = {
        "format_version": MLA_FORMAT_VERSION,
        "kv_lora_rank": kv_lora_rank,
        "rope_dim": rope_dim,
        "partial_rope": partial_rope,
        "svd": svd,
        "rope_key": rope_key,
        "q_bias": first.q_proj.bias is not None,
        "k_bias": first.k_proj.bias is not None,
        "v_bias": first.v_proj.bias is not None,
        "o_bias": first.o_proj.bias is not None,
        "rope_pairs": [p.tolist() for p in pairs],
    }
    for i, layer in enumerate(_layers(model)):
        layer.self_attn = _convert_layer(layer.self_attn, config, i, spec)
    config.mla = spec
    return model


def set_absorbed(model: nn.Module, absorb: bool = True) -> nn.Module:
    """Switch every MLA layer between the plain path and the absorbed (W_UK/W_UV folded) path."""
    for module in model.modules():
        if isinstance(module, MLAAttention):
            module.absorb = absorb
    return model


@torch.no_grad()
def reconstruction_error(original_model: nn.Module, converted_model: nn.Module) -> float:
    """Relative Frobenius error of the low-rank [W_k_nope; W_v] over all layers: ||M - W_up W_down|| / ||M||.

    Measures only the compression (step 2), not the change of function from partial RoPE.
    """
    config = original_model.config
    d = _head_dim(config)
    err2 = norm2 = 0.0
    for orig, conv in zip(_layers(original_model), _layers(converted_model)):
        attn, mla = orig.self_attn, conv.self_attn
        if not isinstance(mla, MLAAttention):
            raise ValueError("converted_model has a layer that is not MLAAttention: convert it with convert_to_mla")
        nope_idx, _ = _dim_layout(mla.rope_pairs.cpu(), d)
        rows = torch.cat([nope_idx[g] + g * d for g in range(nope_idx.shape[0])])
        target = torch.cat((attn.k_proj.weight[rows.to(attn.k_proj.weight.device)], attn.v_proj.weight)).double()
        ups = [mla.v_up_proj.weight] if mla.k_up_proj is None else [mla.k_up_proj.weight, mla.v_up_proj.weight]
        approx = torch.cat(ups).double() @ mla.kv_down_proj.weight.double()
        err2 += (target - approx).pow(2).sum().item()
        norm2 += target.pow(2).sum().item()
    return (err2 / norm2) ** 0.5


def kv_cache_bytes_per_token(config_or_dims: Any, dtype_bytes: int = 2) -> int:
    """KV-cache bytes per token over all layers, of the original model or of its MLA conversion.

    Original: 2·layers·kv_heads·head_dim·bytes. MLA (per-head RoPE key):
    layers·(kv_lora_rank + kv_heads·rope_dim)·bytes.

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
    if mla:
        if mla.get("rope_key", "per-head") != "per-head":
            raise NotImplementedError("only rope_key='per-head' is implemented")
        return layers * (mla["kv_lora_rank"] + n_kv * mla["rope_dim"]) * dtype_bytes
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
