"""Export a model converted with ``convert_to_mla`` as a stock DeepSeek-V3 checkpoint (``model_type: deepseek_v3``).

Every layer is dense (``first_k_dense_replace`` = the number of layers), so the MLP, the norms
and the embeddings map one to one. Attention maps as follows (H = head_dim, D = rope_dim,
R = kv_lora_rank, n = query heads):

- ``q_proj``: each head's [NoPE H | RoPE D] rows, scaled by sqrt((H + D) / H), because DeepSeek
  scales scores by (qk_nope + qk_rope)^-1/2 where the converted model keeps the original H^-1/2
  (``q_lora_rank`` is None: one query projection, as the converted model has).
- ``kv_a_proj_with_mqa`` = [``kv_down_proj``; ``k_rope_proj``], ``kv_a_layernorm`` = ``kv_norm``.
- ``kv_b_proj``: per query head [W_UK; W_UV] of its KV head (GQA heads are repeated).
- RoPE layout: DeepSeek's rotary module builds frequencies θ'^(-2j/D), j < D/2, from
  ``qk_rope_head_dim``. The kept pairs f_j = s·j of the original frequencies θ^(-2f/H) are that
  progression with θ' = θ^(s·D/H), so ``partial_rope`` ``high`` (s = 1) and ``uniform`` (when
  D/2 divides H/2) export; other pair choices have no DeepSeek equivalent. ``interleaved``
  (DeepSeek-V3's own layout, ``rope_interleave: true``) stores pair j in dims (2j, 2j+1);
  ``half-split`` stores it in dims (j, j + D/2).

Only what stock DeepSeek-V3 can represent is exported: a shared RoPE key, a latent norm, no
attention biases (its query projection has none), default RoPE (no scaling) and no sliding
window. Anything else is refused with the conversion option that fixes it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from tunelab.patches.mla.block import head_dim as _head_dim
from tunelab.patches.mla.convert import _layers, kv_cache_bytes_per_token, load_mla_model

ROPE_LAYOUTS = ("interleaved", "half-split")


def _refuse(problem: str, fix: str) -> ValueError:
    return ValueError(f"cannot export to DeepSeek-V3: {problem}; {fix}")


def _check_exportable(config: Any, rope_layout: str) -> None:
    spec = config.mla
    if rope_layout not in ROPE_LAYOUTS:
        raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {rope_layout!r}")
    if spec.get("rope_key") != "shared":
        raise _refuse("DeepSeek has one RoPE key shared by all heads and this model has one per KV head",
                      "convert with --rope-key shared")
    if not spec.get("latent_norm"):
        raise _refuse("DeepSeek always RMS-normalises the latent and this model has no latent norm",
                      "convert with --latent-norm (then heal)")
    if any(spec.get(k) for k in ("q_bias", "k_bias", "v_bias", "o_bias")) or getattr(config, "mlp_bias", False):
        raise _refuse("the model has attention or MLP biases (DeepSeek-V3's query projection has none)",
                      "export a bias-free (Llama/Mistral) model")
    if getattr(config, "sliding_window", None):
        raise _refuse(f"the model uses a sliding window of {config.sliding_window}", "DeepSeek attends to all tokens")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise _refuse(f"the model's RoPE is scaled ({rope.get('rope_type')!r})",
                      "export a model with default RoPE (apply context extension after export)")


def deepseek_rope_theta(config: Any) -> float:
    """θ' such that DeepSeek's frequencies θ'^(-2j/D) are the converted model's kept pairs; refuses other choices."""
    pairs = config.mla["rope_pairs"]
    first = pairs[0][0]
    if any(layer != [first] for layer in pairs):
        raise _refuse("the layers rotate different pairs (partial_rope 2-norm)", "convert with --partial-rope high")
    keep, head_dim = len(first), _head_dim(config)
    stride = first[1] - first[0] if keep > 1 else 1
    if first != [stride * j for j in range(keep)]:
        raise _refuse(f"the kept frequency pairs {first} are not 0, s, 2s, ... (DeepSeek's rotary module "
                      "builds a geometric series from the highest frequency)",
                      "convert with --partial-rope high, or uniform with rope_dim/2 dividing head_dim/2")
    theta = float(config.rope_parameters["rope_theta"])
    return theta ** (stride * 2 * keep / head_dim)


def _interleave(rows: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Reorder the last ``rope_dim`` rows of each block from [a_0..a_P-1, b_0..b_P-1] to [a_0, b_0, a_1, b_1, ...]."""
    half = rope_dim // 2
    order = torch.stack((torch.arange(half), torch.arange(half) + half), dim=-1).flatten()
    return rows[..., order, :]


@torch.no_grad()
def deepseek_state_dict(model: Any, rope_layout: str = "interleaved") -> tuple[Any, dict[str, torch.Tensor]]:
    """The DeepSeek-V3 config and state dict equal to a converted model; refuses one DeepSeek cannot represent."""
    from transformers import DeepseekV3Config

    config = model.config
    _check_exportable(config, rope_layout)
    theta = deepseek_rope_theta(config)
    spec = config.mla
    n_h, n_kv, head_dim = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
    groups, rope_dim, rank = n_h // n_kv, spec["rope_dim"], spec["kv_lora_rank"]
    layers = config.num_hidden_layers
    ds_config = DeepseekV3Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=n_h,
        num_key_value_heads=n_h,
        n_shared_experts=1,
        n_routed_experts=1,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=1,
        first_k_dense_replace=layers,  # every layer dense: no MoE weights
        kv_lora_rank=rank,
        q_lora_rank=None,
        qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=head_dim,
        v_head_dim=head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        rope_interleave=rope_layout == "interleaved",
        attention_bias=False,
        attention_dropout=getattr(config, "attention_dropout", 0.0),
        tie_word_embeddings=getattr(config, "tie_word_embeddings", False),
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None),
        num_mtp_layers=0,
    )

    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if ".self_attn." not in name:
            state[name] = tensor
    q_scale = math.sqrt((head_dim + rope_dim) / head_dim)
    for i, layer in enumerate(_layers(model)):
        attn, prefix = layer.self_attn, f"model.layers.{i}.self_attn."
        dtype = attn.q_proj.weight.dtype
        q = attn.q_proj.weight.double().view(n_h, head_dim + rope_dim, -1) * q_scale
        k_rope = attn.k_rope_proj.weight.double()
        if rope_layout == "interleaved":
            q = torch.cat((q[:, :head_dim], _interleave(q[:, head_dim:], rope_dim)), dim=1)
            k_rope = _interleave(k_rope, rope_dim)
        w_uk = attn.k_up_proj.weight.view(n_kv, head_dim, rank).repeat_interleave(groups, dim=0)
        w_uv = attn.v_up_proj.weight.view(n_kv, head_dim, rank).repeat_interleave(groups, dim=0)
        state[prefix + "q_proj.weight"] = q.reshape(-1, q.shape[-1]).to(dtype)
        state[prefix + "kv_a_proj_with_mqa.weight"] = torch.cat(
            (attn.kv_down_proj.weight, k_rope.to(dtype)))
        state[prefix + "kv_a_layernorm.weight"] = attn.kv_norm.weight.clone()
        state[prefix + "kv_b_proj.weight"] = torch.cat((w_uk, w_uv), dim=1).reshape(-1, rank).contiguous()
        state[prefix + "o_proj.weight"] = attn.o_proj.weight
    return ds_config, state


def export_deepseek(model_dir: str | Path, out_dir: str | Path, rope_layout: str = "interleaved") -> dict[str, Any]:
    """Write ``out_dir``: a DeepSeek-V3 checkpoint (config, safetensors, tokenizer) of the converted model in ``model_dir``.

    Loads the result back with stock ``DeepseekV3ForCausalLM`` (strict: every tensor used, none
    missing) before returning a summary.
    """
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM, GenerationConfig

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = load_mla_model(model_dir)
    dtype = model.dtype
    ds_config, state = deepseek_state_dict(model, rope_layout)
    ds_config.dtype = dtype
    with torch.device("meta"):
        ds_model = DeepseekV3ForCausalLM(ds_config)
    ds_model.load_state_dict(state, strict=not ds_config.tie_word_embeddings, assign=True)
    if ds_config.tie_word_embeddings:
        ds_model.tie_weights()
    missing = [n for n, p in ds_model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"export left DeepSeek-V3 parameters unset: {missing}")
    ds_model.model.rotary_emb = type(ds_model.model.rotary_emb)(ds_config)  # its buffers were built on meta
    leftover = [n for n, b in ds_model.named_buffers() if b.is_meta]
    if leftover:
        raise RuntimeError(f"export left DeepSeek-V3 buffers unset: {leftover}")
    out_dir.mkdir(parents=True, exist_ok=True)
    ds_model.save_pretrained(out_dir)
    if (model_dir / "generation_config.json").exists():
        GenerationConfig.from_pretrained(model_dir).save_pretrained(out_dir)
    tokenizer_saved = False
    try:
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
        tokenizer_saved = True
    except (OSError, ValueError):
        pass
    return {
        "out": str(out_dir),
        "model_type": "deepseek_v3",
        "layers": ds_config.num_hidden_layers,
        "kv_lora_rank": ds_config.kv_lora_rank,
        "qk_rope_head_dim": ds_config.qk_rope_head_dim,
        "qk_nope_head_dim": ds_config.qk_nope_head_dim,
        "rope_theta": ds_config.rope_parameters["rope_theta"],
        "rope_layout": rope_layout,
        "tokenizer": tokenizer_saved,
        "kv_cache_bytes_per_token_bf16": kv_cache_bytes_per_token(model.config, 2),
    }
