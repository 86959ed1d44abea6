"""The recipe patch ``{name: mla, ...}``: its block and its checks, torch-free (the recipe schema imports it).

The checks run against the model's config and the rest of the recipe at validate time, without
weights. ``tunelab convert mla`` uses the same block and checks, with the command's option names in
place of the recipe keys. The conversion itself is in ``convert``, documented there.

Calibration data is any data source a recipe can name (``builtin:NAME``, a local file, a hub
dataset id), read by ``calibration``. ``partial_rope: 2-norm`` needs it (it ranks the frequency
pairs on those tokens); ``rope_key: shared`` (the mix of KV heads) and ``latent_norm`` (the norm's
scale) use it when given and fall back to estimates from the weights otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from tunelab.errors import Problem
from tunelab.specs import PatchBlock, RecipeSpec


# the model types MLA conversion handles (convert reads them from here: this module has no torch)
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
CALIBRATION_FORMATS = ("text", "messages", "sharegpt", "alpaca", "prompt_completion")
MLA_ATTENTION = ("eager", "sdpa")  # the attention backends MLA runs on: its attention reads their masks


class MlaPatch(PatchBlock):
    """Convert every attention layer to multi-head latent attention (MLA): a small cached latent per token."""


    name: Literal["mla"] = Field(description="mla: convert attention to multi-head latent attention")
    kv_lora_rank: int = Field(ge=1, description="size of the cached latent c_KV per token per layer; at most "
                              "2 x num_key_value_heads x head_dim (the original K/V size)")
    rope_dim: int = Field(ge=2, description="RoPE'd key dims kept per KV head (per-head) or in all (shared); even, "
                          "at most head_dim. The other dims lose RoPE and are compressed into the latent")
    partial_rope: Literal["high", "low", "uniform", "2-norm"] = Field(
        "high", description="which frequency pairs keep RoPE: the highest, the lowest, evenly spaced, or those "
        "with the largest query/key norms on calibration_data (2-norm)")
    svd: Literal["joint", "split"] = Field(
        "joint", description="joint: one SVD of [W_k_nope; W_v]; split: separate SVDs of keys and values")
    rope_key: Literal["per-head", "shared"] = Field(
        "per-head", description="per-head: each KV head keeps its own RoPE key dims (MHA2MLA); shared: one RoPE "
        "key for all heads (DeepSeek)")
    latent_norm: bool = Field(False, description="RMS-normalise the cached latent as DeepSeek does (needed by "
                              "tunelab export deepseek; inexact at any rank until healed)")
    calibration_format: Literal["text", "messages", "sharegpt", "alpaca", "prompt_completion"] | None = Field(
        None, description="how to read calibration_data rows (default: from the first row's columns)")
    calibration_data: str | None = Field(
        None, validate_default=True, description="tokens to calibrate on (needed by partial_rope: 2-norm, "
        "used by rope_key: shared and latent_norm): builtin:NAME, a .jsonl/.json/.parquet/.csv file or a hub "
        "dataset id")
    calibration_samples: int = Field(32, ge=1, description="calibration rows (batch)")
    calibration_length: int = Field(128, ge=2, description="tokens per calibration row")

    @field_validator("rope_dim")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"rope_dim {v} is odd: RoPE rotates pairs of dims; use {v - 1} or {v + 1}")
        return v

    @field_validator("calibration_data")
    @classmethod
    def _needed_by_2_norm(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("calibration_data is empty: name a data source, or remove the key")
        if v is None and info.data.get("partial_rope") == "2-norm":
            raise ValueError("partial_rope: 2-norm ranks the frequency pairs on calibration tokens: give "
                             "calibration_data (e.g. builtin:quickstart/text, a .jsonl file or a hub dataset id), "
                             "or use partial_rope: high")
        return v


# ---- what an MLA model supports (one place for the rules: the patch, loading, validate) -------------


def mla_attention_problem(impl: str, subject: str) -> Problem | None:
    """None when MLA attention runs on ``impl``; else the problem of ``subject`` (an MLA model, the mla patch)."""
    if impl in MLA_ATTENTION:
        return None
    return Problem("model.attn_implementation", f"{subject}: its attention reads eager or sdpa masks, not {impl}",
                   "use sdpa")


def mla_unquantized_problem(key: str, path: str) -> Problem:
    """An MLA model loads unquantized (its latent projections are not bitsandbytes layers)."""
    return Problem(key, f"{path} is an MLA model, which tunelab loads unquantized", "use peft.method: lora (or dora)")


def mla_causal_only_problem(key: str, path: str, why: str = "", fix: str = "use an unconverted model") -> Problem:
    """An MLA model loads as a causal LM: never as a reward model, a critic or another score head."""
    return Problem(key, f"{path} is an MLA model, which loads as a causal LM only{why}", fix)


# ---- checks (no weights) -------------------------------------------------------------------------

Keys = Callable[[str], str]


def recipe_keys(where: str) -> Keys:
    """Field name -> the recipe key that names it (``patches[0].rope_dim``); "" names the block."""
    return lambda field: f"{where}.{field}" if field else where


def head_dim(config: Any) -> int:
    """The attention head size of a config (``head_dim``, else hidden_size / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def max_kv_lora_rank(config: Any) -> int:
    """2 x num_key_value_heads x head_dim: the K/V values per token per layer the latent replaces."""
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * n_kv * head_dim(config)


def mla_config_problems(spec: MlaPatch, config: Any, key: Keys, model: str = "model.path",
                        already_hint: str = "drop the mla patch to fine-tune it as it is, or start from the "
                                            "unconverted model") -> list[Problem]:
    """Checks of an mla block against the model's config (read without its weights)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return [Problem(key(""), f"{model} is a {model_type!r} model; MLA conversion supports "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}", "start from a Llama, Qwen2 or Mistral model")]
    if getattr(config, "mla", None):
        return [Problem(key(""), f"{model} is already converted to MLA (its config has an mla block)", already_hint)]
    problems = []
    hd, top = head_dim(config), max_kv_lora_rank(config)
    if spec.rope_dim > hd:
        problems.append(Problem(key("rope_dim"), f"{spec.rope_dim} is larger than the model's head_dim {hd}",
                                f"use an even number from 2 to {hd}"))
    if spec.kv_lora_rank > top:
        n_kv = top // (2 * hd)
        problems.append(Problem(key("kv_lora_rank"), f"{spec.kv_lora_rank} is larger than 2 x num_key_value_heads x "
                                f"head_dim = 2 x {n_kv} x {hd} = {top}, the K/V values per token per layer "
                                "it replaces (a larger latent saves nothing)",
                                f"use 1 to {top}, e.g. {max(1, top // 4)}"))
    return problems


def mla_recipe_problems(spec: MlaPatch, recipe: "RecipeSpec", where: str) -> list[Problem]:
    """Checks of an mla block against the rest of the recipe (attention backend, quantization, method)."""
    problems = []
    if problem := mla_attention_problem(recipe.model.attn_implementation, f"the MLA attention of {where}"):
        problems.append(problem)
    peft_method = recipe.peft.method if recipe.peft is not None else None
    if recipe.model.quantization is not None or peft_method == "qlora":
        what = "peft.method: qlora" if peft_method == "qlora" else "model.quantization"
        problems.append(Problem(where, f"MLA conversion factors full-precision K/V weights (SVD), but {what} "
                                "quantizes them", "use peft.method: lora (MLA models load unquantized)"))
    if recipe.method.model_head != "causal":
        problems.append(Problem(where, f"method {recipe.method.name} trains a sequence classifier; MLA conversion "
                                "is for causal language models", "remove the mla patch from this recipe"))
    return problems
