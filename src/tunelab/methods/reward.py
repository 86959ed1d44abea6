"""Reward models on TRL's RewardTrainer: a scalar head trained on preference pairs.

The model is ``AutoModelForSequenceClassification`` with one label, initialised from a causal
LM checkpoint (typically the SFT output): the transformer body is loaded, the score head is new.
Its reward r(x, y) is the head's output at the last non-pad token of prompt + response. The
pairwise (Bradley-Terry) loss, as in the seed notes and InstructGPT (Ouyang et al. 2022):

    L = -log σ(r(x, y+) - r(x, y-) - m)

with m the pair's ``margin`` when the data has one (Llama 2, Touvron et al. 2023), else 0, plus
``center_rewards_coefficient`` * mean((r+ + r-)^2) when set (Eisenstein et al. 2023).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tunelab.eval.reward import pairwise
from tunelab.methods.base import MemoryTerms, RunHooks, TRLBlock, TRLMethod
from tunelab.methods.common import Default, Owned, Setting, guarded_trainer
from tunelab.specs import RecipeSpec


class RewardBlock(TRLBlock):
    """A reward model: -log σ(r(x,y+) - r(x,y-) - margin) on preference pairs."""

    model_head = "score"
    name: Literal["reward"] = Field(description="reward: a reward model trained on preference pairs")
    center_rewards_coefficient: float | None = Field(None, ge=0, description="pull rewards toward zero mean")


def as_sequences(dataset: Any) -> Any:
    """Pairs (prompt_ids, chosen_ids, rejected_ids) -> whole sequences (chosen_ids, rejected_ids) for scoring."""
    if dataset is None:
        return None
    keep = [c for c in dataset.column_names if c == "margin"]
    return dataset.map(lambda r: {"chosen_ids": r["prompt_ids"] + r["chosen_ids"],
                                  "rejected_ids": r["prompt_ids"] + r["rejected_ids"]},
                       remove_columns=[c for c in dataset.column_names if c not in ("chosen_ids", "rejected_ids", *keep)])


class Reward(TRLMethod[RewardBlock]):
    """A reward model on TRL's RewardTrainer (a sequence classifier with one label)."""

    name = "reward"
    config = RewardBlock
    formats: ClassVar[tuple[str, ...]] = ("preference",)

    def trl_config_class(self) -> type:
        from trl import RewardConfig

        return RewardConfig

    def trl_fields(self, recipe: "RecipeSpec") -> dict[str, Setting]:
        m = self.block(recipe)
        return dict(max_length=Owned("data.max_length", recipe.data.max_length),
                    center_rewards_coefficient=Owned("method.center_rewards_coefficient", m.center_rewards_coefficient),
                    dataset_num_proc=Default(None))

    def memory_terms(self, recipe: "RecipeSpec", tokens: int, vocab: int) -> MemoryTerms:
        return MemoryTerms(rows=2 * recipe.train.batch_size, tokens=tokens,
                           notes=[f"reward: chosen and rejected in one forward: {2 * recipe.train.batch_size} rows "
                                  f"of up to {tokens} tokens"])


    def build_trainer(self, recipe: "RecipeSpec", model: Any, tokenizer: Any, train_ds: Any, eval_ds: Any,
                      hooks: RunHooks) -> Any:
        """A RewardTrainer over tunelab-tokenized pairs."""
        from trl import RewardTrainer

        args = self.trl_config(recipe)
        trainer_cls = guarded_trainer(RewardTrainer, hooks.guards)
        trainer = trainer_cls(model=model, args=args, train_dataset=as_sequences(train_ds),
                              eval_dataset=as_sequences(eval_ds), processing_class=tokenizer,
                              callbacks=hooks.trainer_callbacks())
        # With a quantized base, TRL casts every trainable tensor to bf16 (QLoRA's adapters). LoRA layers cast
        # their input, but the new score head (a plain Linear in modules_to_save) does not: without bf16
        # autocast (fp32 on a CPU) it would get fp32 hidden states. Keep it in the hidden states' dtype.
        hidden_dtype = trainer.model.get_input_embeddings().weight.dtype
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and "lora_" not in name and param.dtype != hidden_dtype:
                param.data = param.data.to(hidden_dtype)
        return trainer

    def evaluate(self, model: Any, eval_ds: Any, recipe: "RecipeSpec", tokenizer: Any) -> dict[str, Any]:
        bs = recipe.train.eval_batch_size or recipe.train.batch_size
        return pairwise(model, eval_ds, bs, tokenizer.pad_token_id or 0)

    def report(self, before: dict[str, Any] | None, after: dict[str, Any], recipe: "RecipeSpec") -> tuple[list[str], dict[str, Any]]:
        head = f"{before['accuracy']:.3f} (new head) -> " if before else ""
        lines = [f"held-out pairwise accuracy: {head}{after['accuracy']:.3f} on {after['pairs']} pairs; "
                 f"mean margin r(chosen) - r(rejected) {after['margin']:+.4f}"]
        return lines, {"pairwise_accuracy": after["accuracy"], "mean_margin": after["margin"]}
