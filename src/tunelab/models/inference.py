"""Loading what training produced (a full model, an adapter, a run directory, MLA models) and scoring with a reward model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.data.collate import pad_right
from tunelab.data.templates import TemplateMismatch, apply_choice, choose_template
from tunelab.errors import Problem, UserError
from tunelab.eval.progress import progress
from tunelab.log import say
from tunelab.models.builtin import builtin_model, builtin_tokenizer
from tunelab.models.load import (
    ensure_pad_token,
    load_gguf_model,
    load_mla_checkpoint,
    pretrained_tokenizer,
    set_stop_tokens,
)
from tunelab.models.ref import ResolvedModel, as_resolved
from tunelab.patches.mla.block import mla_causal_only_problem


def inference_tokenizer(model: ResolvedModel | str) -> Any:
    """The tokenizer saved with a model (the bundled one for built-in bases), with a pad token."""
    from transformers import AutoTokenizer

    model = as_resolved(model)
    if model.kind == "builtin":
        return builtin_tokenizer()  # its own template, as training renders it
    if model.is_gguf:
        tok = pretrained_tokenizer(model)
    else:
        try:
            tok = ensure_pad_token(AutoTokenizer.from_pretrained(model.path))
        except (OSError, ValueError):
            tok = builtin_tokenizer()
    try:  # a model tunelab saved carries its registry template: recognise it (its end-of-turn token)
        apply_choice(tok, choose_template(None, tok))
    except TemplateMismatch:
        pass
    return tok


def load_weights(model: ResolvedModel, head: str = "causal") -> Any:
    """The weights ``model`` names, as saved: built-in, GGUF file, MLA directory, adapter on its base, model directory
    or hub id (``head="score"``: a one-output sequence classifier)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto: Any = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    if model.kind == "builtin":
        return builtin_model(model.name, head=head)
    if model.is_gguf:
        return load_gguf_model(model, auto, None, head=head)
    if model.kind == "mla":
        if head != "causal":
            raise UserError(mla_causal_only_problem(model.key, model.path, fix="use an unconverted model"))
        return load_mla_checkpoint(model.path)
    if model.kind == "adapter":
        from peft import PeftModel

        if model.base is None:
            raise UserError(Problem(model.key, f"{model.path}/adapter_config.json names no base model "
                                    "(base_model_name_or_path)", "a PEFT adapter records the model it was trained on"))
        return PeftModel.from_pretrained(load_weights(model.base, head), model.path)
    model.check()  # not there, or no model in it
    kwargs: dict[str, Any] = {"num_labels": 1} if head == "score" else {}
    if model.revision:
        kwargs["revision"] = model.revision
    if model.kind == "hf_dir":  # a model directory that does not load is broken, not misnamed: a runtime error
        return auto.from_pretrained(model.path, use_safetensors=True, **kwargs)
    try:
        return auto.from_pretrained(model.path, use_safetensors=True, **kwargs)
    except OSError as exc:  # a hub id offline, or not a model
        raise UserError(Problem(model.key, f"cannot load {model.path!r}: {exc}"[:400])) from None


def load_for_inference(model: ResolvedModel | str, merge: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) from a full model dir, a PEFT adapter dir (``merge``: folded into its base), a run dir, a
    GGUF file or a built-in model.

    MLA-converted directories (and adapters trained on one) load with their MLA attention.
    """
    model = as_resolved(model)
    net = load_weights(model)
    if merge and model.kind == "adapter":
        net = net.merge_and_unload()
    return net, inference_tokenizer(model)


def load_reward_model(model: ResolvedModel | str) -> tuple[Any, Any]:
    """(reward model, tokenizer) from a reward run dir, its final/, or a reward LoRA adapter dir."""
    from transformers import AutoModelForSequenceClassification

    model = as_resolved(model)
    if model.kind == "adapter":
        if model.task_type != "SEQ_CLS":
            raise UserError(Problem(model.key, f"{model.path} is a {model.task_type} adapter, not a reward model"))
        net = load_weights(model, head="score")
    elif model.kind == "mla":
        raise UserError(Problem(model.key, f"{model.path} is an MLA-converted causal LM, not a reward model",
                                "train one with method: reward"))
    elif model.kind == "hf_dir":
        if not any(a.endswith("ForSequenceClassification") for a in model.architectures):
            raise UserError(Problem(model.key, f"{model.path} is not a reward model ({', '.join(model.architectures)})",
                                    "train one with method: reward"))
        net = AutoModelForSequenceClassification.from_pretrained(model.path, use_safetensors=True)
    else:
        model.check()  # not there, or no model in it
        raise UserError(Problem(model.key, f"{model.given} is not a reward model directory (config.json) or adapter",
                                "point at a reward model run, its final/ or a reward adapter"))
    tok = inference_tokenizer(model)
    net.config.pad_token_id = tok.pad_token_id
    return net, tok


def run_merge(source: ResolvedModel | str, output: Path) -> Path:
    """Merge a LoRA/DoRA adapter into its base weights and save model + tokenizer to ``output``."""
    model = as_resolved(source, "SOURCE")
    if model.kind != "adapter":
        raise UserError(Problem(model.key, f"{model.given} is not a PEFT adapter (no adapter_config.json)",
                                "merge takes a LoRA/DoRA run dir or adapter dir"))
    if model.peft_type != "LORA":
        raise UserError(Problem(model.key, f"{model.peft_type} adapters cannot be merged into weights",
                                "only LoRA/DoRA/QLoRA adapters merge; prefix/prompt tuning stay adapters"))
    net, tok = load_for_inference(model, merge=True)
    if output.exists() and any(output.iterdir()):
        raise UserError(Problem("--output", f"{output} exists and is not empty"))

    stops = set_stop_tokens(net, tok)
    net.save_pretrained(output)
    tok.save_pretrained(output)
    say(f"merged {model.given} -> {output} (stops at token ids {stops})")
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
