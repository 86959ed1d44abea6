"""``tunelab convert mla`` and ``tunelab export deepseek``: turn a model into MLA, and an MLA model into DeepSeek-V3.

``convert mla`` runs the same conversion as the recipe patch ``{name: mla}`` (and checks the
same things first, named by the command's options) on its own, and saves the result as a
model directory any tunelab command loads: safetensors weights, config.json with the ``mla``
block, tokenizer and generation config. Every check that needs no weights (options, the model's
config, the calibration data) runs before the weights load. Fine-tune the result with a recipe
whose ``model.path`` is the output directory ("healing").
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tunelab.errors import Problem, UserError
from tunelab.log import say
from tunelab.models.builtin import builtin_config, builtin_model, builtin_tokenizer
from tunelab.models.load import load_gguf_model
from tunelab.models.ref import ResolvedModel, resolve_model
from tunelab.patches.mla.block import MlaPatch, mla_config_problems
from tunelab.patches.mla.calibration import calibration_problems, calibration_token_ids

# MlaPatch field -> the option of `tunelab convert mla` that sets it (the CLI builds one option per field)
CONVERT_OPTIONS = {"": "MODEL", **{name: "--" + name.replace("_", "-") for name in MlaPatch.model_fields if name != "name"}}


def _option(field: str) -> str:
    return CONVERT_OPTIONS.get(field, f"--{field.replace('_', '-')}")


def _check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(Problem("--output", f"{output} exists and is not an empty folder", "choose a new folder"))


def mla_spec_from_options(**options: Any) -> Any:
    """The MlaPatch block of ``tunelab convert mla``'s options, or a UserError naming each bad option."""
    from pydantic import ValidationError

    try:
        return MlaPatch(name="mla", **options)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] in ("literal_error", "greater_than_equal", "greater_than", "int_parsing"):
                msg = f"{msg}, got {err.get('input')!r}"
            # the block's own wording names recipe keys; on the command line they are options
            for name, opt in CONVERT_OPTIONS.items():
                if name:
                    msg = msg.replace(f"{name}:", f"{opt}").replace(f"give {name}", f"give {opt}")
            problems.append(Problem(_option(field), msg))
        raise UserError(problems) from None


def _model_config(model: ResolvedModel) -> Any:
    """The config of MODEL without its weights (built-in, local dir, GGUF file or hub id), or a UserError."""
    if model.kind == "builtin":
        return builtin_config(model.name)
    from transformers import AutoConfig

    try:
        where, extra = model.pretrained_args()
        return AutoConfig.from_pretrained(where, **extra)
    except (OSError, ValueError) as exc:
        raise UserError(Problem(model.key, f"cannot read the config of {model.path!r}: {exc}"[:500],
                                "a local model directory, a run's final/, a hub id (offline: in the local "
                                "cache) or builtin:tiny-*")) from None


def _tokenizer(model: ResolvedModel, required: bool) -> Any:
    """The model's tokenizer; None when it has none and nothing needs one (it is then not saved)."""
    if model.kind == "builtin":
        return builtin_tokenizer()
    from transformers import AutoTokenizer

    try:
        where, extra = model.pretrained_args()
        tok = AutoTokenizer.from_pretrained(where, **extra)
    except (OSError, ValueError, TypeError) as exc:
        if required:
            raise UserError(Problem(model.key, f"cannot load the tokenizer of {model.path!r}: {exc}"[:400],
                                    "--calibration-data is tokenized with the model's own tokenizer")) from None
        say(f"note: {model.path} has no tokenizer to load; the output will have none either")
        return None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_model(model: ResolvedModel, device: str) -> Any:
    """The causal LM, in its saved dtype, on ``device`` (sdpa attention: MLA reads its masks)."""
    from transformers import AutoModelForCausalLM

    if model.kind == "builtin":
        m = builtin_model(model.name, attn_implementation="sdpa")
        m.config.name_or_path = model.given
    elif model.is_gguf:
        m = load_gguf_model(model, AutoModelForCausalLM, None, "sdpa")
    else:
        try:
            m = AutoModelForCausalLM.from_pretrained(model.path, dtype="auto", attn_implementation="sdpa",
                                                     use_safetensors=True)
        except OSError as exc:
            raise UserError(Problem(model.key, f"cannot load {model.path!r}: {exc}"[:400],
                                    "only safetensors weights are loaded")) from None
    return m.to(device).eval()


def _kv_weights(model: Any) -> Any:
    """What ``reconstruction_error`` reads of the original model: its config and each layer's k/v projections.

    The weights are referenced, not copied: the conversion replaces the modules, not these tensors.
    """
    layers = [SimpleNamespace(self_attn=SimpleNamespace(k_proj=layer.self_attn.k_proj, v_proj=layer.self_attn.v_proj))
              for layer in model.model.layers]
    return SimpleNamespace(config=model.config, model=SimpleNamespace(layers=layers))


def run_convert_mla(model: str, output: str | Path, kv_lora_rank: int, rope_dim: int, partial_rope: str = "high",
                    svd: str = "joint", rope_key: str = "per-head", latent_norm: bool = False,
                    calibration_data: str | None = None, calibration_format: str | None = None,
                    calibration_samples: int = 32, calibration_length: int = 128,
                    device: str = "auto") -> dict[str, Any]:
    """Convert MODEL's attention to MLA and save it to ``output``; returns (and prints) a summary."""
    output = Path(output)
    spec = mla_spec_from_options(kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, partial_rope=partial_rope, svd=svd,
                                 rope_key=rope_key, latent_norm=latent_norm, calibration_data=calibration_data,
                                 calibration_format=calibration_format, calibration_samples=calibration_samples,
                                 calibration_length=calibration_length)
    _check_output(output)
    source = resolve_model(model, key="MODEL")  # a run dir means its final/
    if source.missing:
        raise UserError(source.missing)
    if source.kind == "adapter":
        raise UserError(Problem("MODEL", f"{source.path} is a PEFT adapter", "merge it first: tunelab merge RUN -o "
                                "DIR, then convert DIR"))
    model = source.path
    config = _model_config(source)
    problems = mla_config_problems(spec, config, _option, model=model,
                                   already_hint="convert the original model; a converted one fine-tunes as it is")
    problems += calibration_problems(spec, _option)
    if problems:
        raise UserError(problems)
    import torch

    from tunelab.patches.mla.convert import convert_to_mla, kv_cache_bytes_per_token, reconstruction_error

    tokenizer = _tokenizer(source, required=spec.calibration_data is not None)
    calibration = None
    if spec.calibration_data:
        calibration = torch.tensor(calibration_token_ids(spec, tokenizer, _option), dtype=torch.long)

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    net = _load_model(source, device)
    dtype_bytes = next(net.parameters()).element_size()
    before = kv_cache_bytes_per_token(net.config, dtype_bytes)
    original = _kv_weights(net)
    convert_to_mla(net, kv_lora_rank=spec.kv_lora_rank, rope_dim=spec.rope_dim, partial_rope=spec.partial_rope,
                   svd=spec.svd, rope_key=spec.rope_key, calibration_ids=calibration, latent_norm=spec.latent_norm)
    after = kv_cache_bytes_per_token(net.config, dtype_bytes)
    error = reconstruction_error(original, net)
    del original

    output.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(output)  # safetensors, config.json with the mla block, generation_config.json
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    summary = {"model": model, "output": str(output), "kv_lora_rank": spec.kv_lora_rank, "rope_dim": spec.rope_dim,
               "partial_rope": spec.partial_rope, "svd": spec.svd, "rope_key": spec.rope_key,
               "latent_norm": spec.latent_norm, "calibration_tokens": 0 if calibration is None else calibration.numel(),
               "dtype": str(next(net.parameters()).dtype).removeprefix("torch."),
               "kv_cache_bytes_per_token_before": before, "kv_cache_bytes_per_token_after": after,
               "kv_cache_reduction": 1 - after / before, "reconstruction_error": error}
    rope = f"{spec.rope_dim} per KV head" if spec.rope_key == "per-head" else f"{spec.rope_dim} shared"
    say(f"converted {model} to MLA: kv_lora_rank {spec.kv_lora_rank}, RoPE dims {rope} (partial_rope "
         f"{spec.partial_rope}, svd {spec.svd}{', latent norm' if spec.latent_norm else ''})")
    print(f"KV cache per token ({summary['dtype']}): {before:,} -> {after:,} bytes ({100 * (1 - after / before):.1f}% "
          "smaller)")
    print(f"reconstruction error of [W_k_nope; W_v] (relative Frobenius, all layers): {error:.4f}")
    say(f"saved to {output}; fine-tune it with model.path: {output}, check it with "
         f"`tunelab eval {output} --task kv-cache`")
    return summary


def run_export_deepseek(model: str, output: str | Path, rope_layout: str = "interleaved") -> dict[str, Any]:
    """Export an MLA-converted model (dir or run) as a DeepSeek-V3 checkpoint; prints and returns the summary."""
    layouts = ("interleaved", "half-split")
    if rope_layout not in layouts:
        raise UserError(Problem("--rope-layout", f"unknown layout {rope_layout!r}", "use " + " or ".join(layouts)))
    output = Path(output)
    _check_output(output)
    source = resolve_model(model, key="MODEL")  # a run dir means its final/
    path, p = source.path, Path(source.path)
    if source.kind == "adapter":
        raise UserError(Problem("MODEL", f"{path} is a PEFT adapter", "merge it first: tunelab merge RUN -o DIR, then "
                                "export DIR"))
    if source.kind != "mla":
        raise UserError(Problem("MODEL", f"{model} is not an MLA-converted model directory (no mla block in its "
                                "config.json)", "convert it first: tunelab convert mla MODEL -o DIR --kv-lora-rank R "
                                "--rope-dim D --rope-key shared --latent-norm"))
    from tunelab.patches.mla.export import export_deepseek

    try:
        summary = export_deepseek(p, output, rope_layout=rope_layout)
    except ValueError as exc:  # the model cannot be exported: the message names the conversion option to change
        raise UserError(Problem("MODEL", str(exc))) from None
    say(f"exported {path} as DeepSeek-V3 to {output}")
    print(json.dumps(summary, indent=2, default=str))
    return summary
