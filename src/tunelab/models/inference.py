"""Loading what training produced (a full model, an adapter, a run directory, MLA models) and scoring with a reward model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.data.collate import pad_right
from tunelab.data.templates import TemplateMismatch, apply_choice, choose_template
from tunelab.errors import Problem, UserError
from tunelab.eval.progress import progress
from tunelab.log import say
from tunelab.models.builtin import BUILTIN_MODELS, builtin_model, builtin_tokenizer
from tunelab.models.gguf import REAL_BUILTINS, is_gguf_path
from tunelab.models.load import (
    ensure_pad_token,
    is_tiny_builtin,
    load_gguf_model,
    load_mla_checkpoint,
    mla_checkpoint,
    pretrained_tokenizer,
    set_stop_tokens,
)


def resolve_model_dir(path: str) -> str:
    """A run dir means its final/; anything else is used as given."""
    p = Path(path)
    if (p / "final").is_dir() and not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        return str(p / "final")
    return path


def inference_tokenizer(path: str) -> Any:
    """The tokenizer saved with a model (the bundled one for built-in bases), with a pad token."""
    from transformers import AutoTokenizer

    if is_gguf_path(path):
        tok = pretrained_tokenizer(path, key="MODEL")
    else:
        try:
            tok = ensure_pad_token(AutoTokenizer.from_pretrained(path))
        except (OSError, ValueError):
            tok = builtin_tokenizer()
    try:  # a model tunelab saved carries its registry template: recognise it (its end-of-turn token)
        apply_choice(tok, choose_template(None, tok))
    except TemplateMismatch:
        pass
    return tok


def load_base(path: str, head: str = "causal") -> Any:
    """A base model named by a path an adapter records: built-in, GGUF file, MLA directory or HF directory/hub id."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto: Any = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    if is_tiny_builtin(path):
        return builtin_model(path[len("builtin:") :], head=head)
    if is_gguf_path(path):
        return load_gguf_model(path, auto, None, head=head, key="MODEL")
    if head == "causal" and mla_checkpoint(path):
        return load_mla_checkpoint(path)
    kwargs: dict[str, Any] = {"num_labels": 1} if head == "score" else {}
    try:
        return auto.from_pretrained(path, use_safetensors=True, **kwargs)
    except OSError as exc:
        raise UserError(Problem("MODEL", f"cannot load {path!r}: {exc}"[:400])) from None


def load_for_inference(path: str, merge: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) from a full model dir, a PEFT adapter dir, a run dir, or builtin:tiny-*.

    MLA-converted directories (and adapters trained on one) load with their MLA attention.
    """
    from transformers import AutoModelForCausalLM

    if path.startswith("builtin:"):
        name = path[len("builtin:") :]
        if name not in BUILTIN_MODELS and name not in REAL_BUILTINS:
            known = ", ".join(f"builtin:{k}" for k in {**BUILTIN_MODELS, **REAL_BUILTINS})
            raise UserError(Problem("MODEL", f"unknown built-in model {path!r}", "known: " + known))
        if name in BUILTIN_MODELS:
            return builtin_model(name), builtin_tokenizer()
    if is_gguf_path(path):
        return load_base(path), inference_tokenizer(path)
    path = resolve_model_dir(path)
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        from peft import PeftModel

        cfg = json.loads((p / "adapter_config.json").read_text())
        base = load_base(cfg.get("base_model_name_or_path") or "")
        model: Any = PeftModel.from_pretrained(base, path)
        if merge:
            model = model.merge_and_unload()
    elif mla_checkpoint(p):
        model = load_mla_checkpoint(p)
    elif p.is_dir() and (p / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    elif p.exists():
        raise UserError(Problem("MODEL", f"{path} holds neither a model (config.json) nor an adapter"))
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
        except OSError as exc:
            raise UserError(Problem("MODEL", f"cannot load {path!r}: {exc}"[:400])) from None
    return model, inference_tokenizer(path)


def load_reward_model(path: str) -> tuple[Any, Any]:
    """(reward model, tokenizer) from a reward run dir, its final/, or a reward LoRA adapter dir."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_dir(path)
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        from peft import PeftModel

        cfg = json.loads((p / "adapter_config.json").read_text())
        if cfg.get("task_type") != "SEQ_CLS":
            raise UserError(Problem("MODEL", f"{path} is a {cfg.get('task_type')} adapter, not a reward model"))
        base = load_base(cfg["base_model_name_or_path"], head="score")
        model = PeftModel.from_pretrained(base, path)
    elif (p / "config.json").is_file():
        cfg = json.loads((p / "config.json").read_text())
        if cfg.get("mla"):
            raise UserError(Problem("MODEL", f"{path} is an MLA-converted causal LM, not a reward model",
                                    "train one with method: reward"))
        if not any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or []):
            raise UserError(Problem("MODEL", f"{path} is not a reward model ({', '.join(cfg.get('architectures') or [])})",
                                    "train one with method: reward"))
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
    else:
        raise UserError(Problem("MODEL", f"{path} holds neither a model (config.json) nor an adapter"))
    tok = inference_tokenizer(path)
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def run_merge(source: str, output: Path) -> Path:
    """Merge a LoRA/DoRA adapter into its base weights and save model + tokenizer to ``output``."""
    path = resolve_model_dir(source)
    if not (Path(path) / "adapter_config.json").is_file():
        raise UserError(Problem("SOURCE", f"{source} is not a PEFT adapter (no adapter_config.json)",
                                "merge takes a LoRA/DoRA run dir or adapter dir"))
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise UserError(Problem("SOURCE", f"{cfg.get('peft_type')} adapters cannot be merged into weights",
                                "only LoRA/DoRA/QLoRA adapters merge; prefix/prompt tuning stay adapters"))
    model, tok = load_for_inference(path, merge=True)
    if output.exists() and any(output.iterdir()):
        raise UserError(Problem("--output", f"{output} exists and is not empty"))

    stops = set_stop_tokens(model, tok)
    model.save_pretrained(output)
    tok.save_pretrained(output)
    say(f"merged {source} -> {output} (stops at token ids {stops})")
    return output


def score(model: Any, sequences: list[list[int]], batch_size: int, pad_id: int) -> list[float]:
    """The reward of each token sequence (right-padded; the head reads the last real token)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []

    bar = progress(len(sequences), "scoring", "seq")
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            ids, mask = pad_right(sequences[start : start + batch_size], pad_id)
            out += model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float().tolist()
            bar.update(len(ids))
    bar.close()
    return out
