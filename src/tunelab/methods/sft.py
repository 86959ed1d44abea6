"""Supervised fine-tuning on TRL's SFTTrainer, loss on response tokens only.

The data arrive tokenized by tunelab (``tunelab.data``): ``input_ids`` plus ``labels`` with
-100 on every token that is not an assistant/completion token, so TRL only packs and
collates. Packing is best-fit decreasing and padding-free: the packed rows carry
``position_ids`` that restart at 0, from which transformers builds a block-diagonal causal
mask (SDPA/eager) or varlen kernels (flash-attention), so packed examples never attend to each
other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from tunelab.recipe.schema import Recipe


class SFTMethod(BaseModel):
    """Supervised fine-tuning: next-token loss on assistant (or completion) tokens."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: Literal["sft"]
    loss_type: Literal["nll", "dft"] = Field("nll", description="nll, or dft (dynamic fine-tuning)")
    neftune_noise_alpha: float | None = Field(None, gt=0, description="NEFTune embedding noise")
    trl: dict[str, Any] = Field(default_factory=dict, description="extra SFTConfig fields, validated before training")


# Fields tunelab sets itself from the recipe; setting them in method.trl would fight the recipe.
OWNED_TRL_FIELDS = {
    "output_dir", "num_train_epochs", "max_steps", "learning_rate", "per_device_train_batch_size",
    "gradient_accumulation_steps", "seed", "max_length", "packing", "padding_free", "bf16", "fp16",
    "gradient_checkpointing", "activation_checkpointing", "report_to", "logging_steps", "save_steps", "save_total_limit",
    "dataset_kwargs", "assistant_only_loss", "completion_only_loss",
}


ACCEPTED_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")


def trl_config_class() -> type:
    from trl import SFTConfig

    return SFTConfig


def trl_config(recipe: "Recipe", **extra: Any) -> Any:
    """Build the SFTConfig for a recipe (raises TypeError/ValueError on a bad ``method.trl``)."""
    from trl import SFTConfig

    from tunelab.methods.common import training_arguments

    m: SFTMethod = recipe.method
    kwargs = training_arguments(recipe)
    kwargs.update(
        max_length=recipe.data.max_length,
        packing=recipe.data.packing,
        packing_strategy="bfd",
        padding_free=recipe.data.packing,
        loss_type=m.loss_type,
        neftune_noise_alpha=m.neftune_noise_alpha,
        # tunelab hands over input_ids + labels; TRL must not re-tokenize or re-mask them
        assistant_only_loss=False,
        completion_only_loss=None,
        dataset_num_proc=None,
    )
    kwargs.update(m.trl)
    kwargs.update(extra)
    return SFTConfig(**kwargs)


def build_trainer(recipe: "Recipe", model: Any, tokenizer: Any, train_ds: Any, eval_ds: Any, callbacks: list) -> Any:
    """An SFTTrainer over tunelab-tokenized data (input_ids + labels)."""
    from tunelab.methods.common import atomic_checkpoints

    from trl import SFTTrainer

    args = trl_config(recipe)
    trainer_cls = atomic_checkpoints(SFTTrainer)
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
