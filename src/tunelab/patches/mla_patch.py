"""The recipe patch ``{name: mla, ...}``: convert a model's attention to multi-head latent attention.

This is the torch-free half of the MLA patch that the recipe schema imports: the recipe block,
the checks against a model's config and the rest of the recipe (validate time, no weights), the
calibration tokens, and ``apply_mla``, which imports torch and ``tunelab.patches.mla`` (the
conversion itself, documented there) only when it runs. ``tunelab convert mla`` uses the same
block and checks, with the command's option names in place of the recipe keys.

Calibration data is any data source a recipe can name (``builtin:NAME``, a local file, a hub
dataset id). Its rows are read as running text: ``text`` rows as they are, conversations
through the tokenizer's chat template, prompt/completion pairs joined. Documents are joined
with the EOS token and cut into ``calibration_samples`` rows of ``calibration_length`` tokens.
``partial_rope: 2-norm`` needs it (it ranks the frequency pairs on those tokens); ``rope_key:
shared`` (the mix of KV heads) and ``latent_norm`` (the norm's scale) use it when given and
fall back to estimates from the weights otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from tunelab.errors import DataError, Problem
from tunelab.specs import Strict

# the model types MLA conversion handles (tunelab.patches.mla reads them from here: this module has no torch)
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
CALIBRATION_FORMATS = ("text", "messages", "sharegpt", "alpaca", "prompt_completion")
EAGER_OR_SDPA = ("eager", "sdpa")


class MlaPatch(Strict):
    """Convert every attention layer to multi-head latent attention (MLA): a small cached latent per token."""


    name: Literal["mla"]
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


# ---- checks (no weights) -------------------------------------------------------------------------

Keys = Callable[[str], str]


def recipe_keys(where: str) -> Keys:
    """Field name -> the recipe key that names it (``patches[0].rope_dim``); "" names the block."""
    return lambda field: f"{where}.{field}" if field else where


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def max_kv_lora_rank(config: Any) -> int:
    """2 x num_key_value_heads x head_dim: the K/V values per token per layer the latent replaces."""
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * n_kv * _head_dim(config)


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
    head_dim, top = _head_dim(config), max_kv_lora_rank(config)
    if spec.rope_dim > head_dim:
        problems.append(Problem(key("rope_dim"), f"{spec.rope_dim} is larger than the model's head_dim {head_dim}",
                                f"use an even number from 2 to {head_dim}"))
    if spec.kv_lora_rank > top:
        n_kv = top // (2 * head_dim)
        problems.append(Problem(key("kv_lora_rank"), f"{spec.kv_lora_rank} is larger than 2 x num_key_value_heads x "
                                f"head_dim = 2 x {n_kv} x {head_dim} = {top}, the K/V values per token per layer "
                                "it replaces (a larger latent saves nothing)",
                                f"use 1 to {top}, e.g. {max(1, top // 4)}"))
    return problems


def mla_recipe_problems(spec: MlaPatch, recipe: Any, where: str) -> list[Problem]:
    """Checks of an mla block against the rest of the recipe (attention backend, quantization, method)."""
    problems = []
    impl = recipe.model.attn_implementation
    if impl not in EAGER_OR_SDPA:
        problems.append(Problem("model.attn_implementation", f"{impl} cannot run the MLA attention of {where}: it "
                                "reads eager or sdpa attention masks", "use sdpa"))
    peft_method = recipe.peft.method if recipe.peft is not None else None
    if recipe.model.quantization is not None or peft_method == "qlora":
        what = "peft.method: qlora" if peft_method == "qlora" else "model.quantization"
        problems.append(Problem(where, f"MLA conversion factors full-precision K/V weights (SVD), but {what} "
                                "quantizes them", "use peft.method: lora (MLA models load unquantized)"))
    if recipe.method.model_head != "causal":
        problems.append(Problem(where, f"method {recipe.method.name} trains a sequence classifier; MLA conversion "
                                "is for causal language models", "remove the mla patch from this recipe"))
    return problems


def detect_calibration_format(row: Any) -> str | None:
    """The format of a calibration row from its columns, or None when they fit none."""
    if not isinstance(row, dict):
        return None
    for fmt, columns in (("text", ("text",)), ("messages", ("messages",)), ("sharegpt", ("conversations",)),
                         ("alpaca", ("instruction", "output")), ("prompt_completion", ("prompt", "completion"))):
        if all(c in row for c in columns):
            return fmt
    return None


def _calibration_source(spec: MlaPatch, key: Keys, row: Any) -> Any:
    """The DataSource that reads calibration rows, its format given or taken from ``row``."""
    from tunelab.specs import DataSource

    fmt = spec.calibration_format or detect_calibration_format(row)
    if fmt is None:
        cols = ", ".join(map(str, row)) if isinstance(row, dict) and row else "none"
        raise DataError(Problem(key("calibration_data"), f"cannot tell the format of {spec.calibration_data} from its "
                                f"columns ({cols})", f"set {key('calibration_format')}: "
                                + " | ".join(CALIBRATION_FORMATS)))
    return DataSource(source=spec.calibration_data or "", format=fmt)  # type: ignore[arg-type]


def _reader(spec: MlaPatch) -> Any:
    """A DataSource to read the calibration rows with (a hub dataset's split "train", no config)."""
    from tunelab.specs import DataSource

    return DataSource(source=spec.calibration_data or "", format=spec.calibration_format or "text")


def calibration_problems(spec: MlaPatch, key: Keys) -> list[Problem]:
    """The calibration source resolves and, when local, its first row reads in its format (no tokenizer)."""
    if not spec.calibration_data:
        return []
    from tunelab.data.formats import BadRow, to_canonical
    from tunelab.data.sources import iter_rows, resolve_source

    try:
        resolved = resolve_source(spec.calibration_data, key("calibration_data"))
        if not resolved.is_local:
            return []  # a hub dataset: read when the patch is applied
        for rowno, row in iter_rows(_reader(spec), resolved, limit=1):
            src = _calibration_source(spec, key, row)
            try:
                to_canonical(row, src)
            except BadRow as exc:
                return [Problem(key("calibration_data"), f"{resolved.label} row {rowno}: {exc}",
                                f"read as {src.format}; set {key('calibration_format')} to match the data")]
    except DataError as exc:
        return list(exc.problems)
    return []


# ---- calibration tokens and applying the patch ----------------------------------------------------


def _document_ids(canonical: dict[str, Any], tokenizer: Any) -> list[int]:
    """One calibration row as token ids: text as it is, a conversation through the chat template."""
    if "messages" in canonical:
        if getattr(tokenizer, "chat_template", None):
            out = tokenizer.apply_chat_template(canonical["messages"], tokenize=True, return_dict=True)
            return list(out["input_ids"])
        text = "\n".join(m["content"] for m in canonical["messages"])
    elif "prompt" in canonical:
        text = f"{canonical['prompt']}{canonical['completion']}"
    else:
        text = canonical["text"]
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def calibration_token_ids(spec: MlaPatch, tokenizer: Any, key: Keys | None = None) -> list[list[int]]:
    """``calibration_samples`` rows of ``calibration_length`` token ids from ``calibration_data``.

    Documents are joined with the EOS token; rows are read only as far as needed. Too few tokens
    is a DataError naming the keys to change (``key``: field -> its name, default the recipe's).
    """
    key = key or recipe_keys("patches")
    from tunelab.data.formats import BadRow, to_canonical
    from tunelab.data.sources import iter_rows, resolve_source

    if not spec.calibration_data:
        raise ValueError("no calibration_data to read")
    resolved = resolve_source(spec.calibration_data, key("calibration_data"))
    need = spec.calibration_samples * spec.calibration_length
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    src = None
    rows = bad = 0
    # each usable row gives a token at least: the limit bounds a local read and makes a hub read stream
    for _, row in iter_rows(_reader(spec), resolved, limit=need):
        rows += 1
        if src is None:
            src = _calibration_source(spec, key, row)
        try:
            doc = _document_ids(to_canonical(row, src), tokenizer)
        except BadRow:
            bad += 1
            continue
        if ids and eos is not None:
            ids.append(eos)
        ids.extend(doc)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise DataError(Problem(key("calibration_data"), f"{resolved.label} gives {len(ids)} tokens ({rows} rows, "
                                f"{bad} unusable); calibration needs calibration_samples x calibration_length = "
                                f"{spec.calibration_samples} x {spec.calibration_length} = {need}",
                                f"use more data, or lower {key('calibration_samples')} or "
                                f"{key('calibration_length')}"))
    length = spec.calibration_length
    return [ids[i * length : (i + 1) * length] for i in range(spec.calibration_samples)]


def apply_mla(model: Any, spec: MlaPatch, tokenizer: Any = None, key: Keys | None = None) -> dict[str, Any]:
    """Convert a loaded model's attention to MLA in place; returns a record (ranks, KV-cache bytes per token).

    Calibration tokens are read (and the data errors raised) before any weight changes.
    """
    import torch

    from tunelab.patches.mla import convert_to_mla, kv_cache_bytes_per_token

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


__all__ = ["SUPPORTED_MODEL_TYPES", "MlaPatch", "apply_mla", "calibration_problems", "calibration_token_ids",
           "mla_config_problems", "mla_recipe_problems", "recipe_keys"]
