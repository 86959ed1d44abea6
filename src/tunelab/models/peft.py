"""PEFT from a recipe's ``peft:`` block: LoRA, DoRA, QLoRA, prefix tuning, prompt tuning.

LoRA (Hu et al. 2021) adds B A with B = 0 at init, so a fresh adapter changes no output;
the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023). DoRA
(Liu et al. 2024) also learns a per-column magnitude. QLoRA (Dettmers et al. 2023) trains LoRA
on a 4-bit NF4 base.
"""

from __future__ import annotations

from typing import Any

from tunelab.specs import LoraSpec, PrefixSpec, PromptSpec, QuantizationSpec, RecipeSpec


def quantization_of(recipe: "RecipeSpec") -> Any:
    """The quantization block that applies: ``peft`` (qlora, default 4-bit nf4) or ``model``."""
    p = recipe.peft
    if p is not None and p.method == "qlora":
        return p.quantization or QuantizationSpec()
    return recipe.model.quantization


def peft_config(spec: "LoraSpec | PrefixSpec | PromptSpec", head: str = "causal") -> Any:
    """The peft library config for a recipe ``peft`` block.

    For a reward model (``head="score"``) the task is sequence classification, so PEFT also
    trains and saves the new score head (``modules_to_save``).
    """
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    task = TaskType.SEQ_CLS if head == "score" else TaskType.CAUSAL_LM
    if isinstance(spec, LoraSpec):
        return LoraConfig(
            task_type=task,
            r=spec.r,
            lora_alpha=spec.alpha,  # type: ignore[arg-type]  # PEFT annotates int; a float alpha scales as well
            lora_dropout=spec.dropout,
            target_modules=spec.target_modules,
            use_rslora=spec.use_rslora,
            use_dora=spec.method == "dora",
            bias=spec.bias,
            modules_to_save=spec.modules_to_save,
        )
    if isinstance(spec, PrefixSpec):
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=spec.num_virtual_tokens,
                                  prefix_projection=spec.prefix_projection)
    return PromptTuningConfig(task_type=task, num_virtual_tokens=spec.num_virtual_tokens)


def apply_peft(model: Any, spec: "LoraSpec | PrefixSpec | PromptSpec", tokenizer: Any, gradient_checkpointing: bool = False,
               head: str = "causal") -> Any:
    """Wrap ``model`` in a PeftModel; only the adapter's parameters stay trainable."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    model = get_peft_model(model, peft_config(spec, head))
    if spec.method == "lora":
        from tunelab.models.lora_fused import fuse_lora_updates

        fuse_lora_updates(model)  # the scaling and the add inside the GEMM (same math, fewer passes)
    if spec.method == "prompt" and spec.init_text:
        # initialise the soft prompt from the text's token embeddings, repeated to fill it
        ids = tokenizer(spec.init_text, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        ids = (ids * (spec.num_virtual_tokens // len(ids) + 1))[: spec.num_virtual_tokens]
        emb = model.get_input_embeddings()(torch.tensor(ids, device=model.device)).detach()
        model.prompt_encoder["default"].embedding.weight.data.copy_(emb)
    return model


def uses_virtual_tokens(spec: "LoraSpec | PrefixSpec | PromptSpec") -> bool:
    """Prefix/prompt tuning prepend virtual tokens, which packed position ids cannot express."""
    return spec is not None and spec.method in ("prefix", "prompt")
