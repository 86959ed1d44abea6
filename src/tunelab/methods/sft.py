"""Supervised fine-tuning on TRL's SFTTrainer, loss on response tokens only.

The data arrive tokenized by tunelab (``tunelab.data``): ``input_ids`` plus ``labels`` with
-100 on every token that is not an assistant/completion token, so TRL only packs and
collates. Packing is best-fit decreasing: packed rows carry ``position_ids`` that restart at 0
at every example. With flash-attention the batch is padding-free (one concatenated row, varlen
kernels); with SDPA/eager each packed row stays a row of its own (``tunelab.data.collate``) and
transformers builds a block-diagonal causal mask from the position ids. Either way packed
examples never attend to each other.

For micro-batches whose scored logits are small, the loss comes from the LM head applied only at
the positions that have a label (``tunelab.models.logits``) rather than from TRL's chunked fused
head over every position: same loss, gradients and metrics, less compute and memory.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, cast

from pydantic import Field

from tunelab.data.collate import PackedRowsCollator, uses_varlen_attention
from tunelab.eval.perplexity import perplexity
from tunelab.methods.base import MemoryTerms, RunHooks, TRLBlock, TRLMethod
from tunelab.methods.common import Default, Owned, Setting, guarded_trainer
from tunelab.models.attention import use_packed_sdpa
from tunelab.models.logits import scored_logits
from tunelab.specs import RecipeSpec


class SFTBlock(TRLBlock):
    """Supervised fine-tuning: next-token loss on assistant (or completion) tokens."""

    name: Literal["sft"] = Field(description="sft: supervised fine-tuning")
    loss_type: Literal["nll", "dft"] = Field("nll", description="nll, or dft (dynamic fine-tuning)")
    neftune_noise_alpha: float | None = Field(None, gt=0, description="NEFTune embedding noise")


# Above this many bytes of fp32 logits per micro-batch, TRL's chunked fused LM head is used (it never
# materialises the logits: the memory win for 150k-token vocabularies on a GPU). Below it, the
# plain head + cross-entropy is used: on small vocabularies it is ~2x faster on a CPU
# (measured: docs/benchmarks.md) and the logits cost little memory.
FUSED_HEAD_MIN_LOGIT_BYTES = 256 * 2**20


def sft_trainer_class() -> type:
    """TRL's SFTTrainer with a direct loss path for micro-batches whose logits are small."""
    import torch
    from trl import SFTTrainer

    class TunelabSFTTrainer(SFTTrainer):
        def _direct_loss_ok(self, inputs: dict) -> bool:
            if self.compute_loss_func is not None or self.label_smoother is not None or self.aux_loss_enabled:
                return False
            args: Any = self.args  # an SFTConfig
            if args.loss_type not in ("nll", "dft") or "labels" not in inputs:
                return False
            sp = getattr(self.accelerator, "parallelism_config", None)
            if sp is not None and getattr(sp, "sp_enabled", False):
                return False
            model: Any = self.model
            head = model.get_output_embeddings()
            vocab = head.weight.shape[0] if head is not None else None
            scored = int((inputs["labels"][:, 1:] != -100).sum())  # the head runs only where a label is scored
            return vocab is not None and scored * vocab * 4 < FUSED_HEAD_MIN_LOGIT_BYTES

        def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            real_tokens = inputs.pop("num_real_tokens", None)  # set by PackedRowsCollator
            own: Any = self.model
            mode = "train" if own.training else "eval"
            if return_outputs or not self._direct_loss_ok(inputs):
                before = self._total_train_tokens
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                if real_tokens is not None and mode == "train":  # TRL counts one row of a row-packed batch
                    self._total_train_tokens = before + self._count_tokens(inputs, real_tokens)
                    self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
                return result
            labels = inputs["labels"]
            model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            model_inputs["use_cache"] = False
            # the logit at position t scores the label at t + 1; the head runs at those positions only
            rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
            logits = scored_logits(model, model_inputs, rows, cols).float()
            target = labels[:, 1:][rows, cols].to(logits.device)
            lp = logits.log_softmax(-1)  # once: for the loss and for the logged metrics
            logp = lp.gather(-1, target[:, None]).squeeze(-1)
            per_token = -logp
            if cast(Any, self.args).loss_type == "dft":  # dynamic fine-tuning: weight each token by its own probability
                per_token = per_token * logp.exp().detach()
            denom = target.numel() if num_items_in_batch is None else num_items_in_batch
            loss = per_token.sum() / torch.as_tensor(denom, device=logits.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            with torch.no_grad():  # the same metrics TRL logs: entropy and top-1 accuracy on label tokens
                lp = lp.detach()
                entropy = -(lp.exp() * lp).sum(-1).sum()
                correct = (logp.detach() >= lp.amax(-1)).sum()  # the label's log-prob is the largest (argmax)
            gather = self.accelerator.gather_for_metrics
            n = gather(torch.tensor(target.numel(), device=logits.device)).sum()
            e, c = gather(entropy).sum(), gather(correct).sum()
            self._metrics[mode]["entropy"].append((e / n).item() if n > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append((c / n).item() if n > 0 else 0.0)
            if mode == "train":
                self._total_train_tokens += self._count_tokens(inputs, real_tokens)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

        def _count_tokens(self, inputs: dict, real_tokens: int | None) -> int:
            """Non-pad tokens in this micro-batch, summed over ranks (TRL's num_tokens metric)."""
            device = inputs["input_ids"].device
            if real_tokens is not None:
                local = torch.tensor(real_tokens, device=device)
            elif "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:  # TRL's padding-free batch: one row, no pads
                local = torch.tensor(inputs["input_ids"].numel(), device=device)
            return self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size

    return TunelabSFTTrainer


class SFT(TRLMethod[SFTBlock]):
    """Supervised fine-tuning on TRL's SFTTrainer over tunelab-tokenized rows (input_ids + labels)."""

    name = "sft"
    config = SFTBlock
    formats: ClassVar[tuple[str, ...]] = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
    eval_before = False  # only with train.eval_before_train

    def trl_config_class(self) -> type:
        from trl import SFTConfig

        return SFTConfig

    def trl_fields(self, recipe: "RecipeSpec") -> dict[str, Setting]:
        m = self.block(recipe)
        tokenized = "tunelab: the data arrive tokenized and masked by tunelab; TRL must not re-tokenize or re-mask them"
        return dict(
            max_length=Owned("data.max_length", recipe.data.max_length),
            packing=Owned("data.packing", recipe.data.packing),
            packing_strategy=Owned("data.packing", "bfd"),
            padding_free=Owned("data.packing", recipe.data.packing),
            loss_type=Owned("method.loss_type", m.loss_type),
            neftune_noise_alpha=Owned("method.neftune_noise_alpha", m.neftune_noise_alpha),
            assistant_only_loss=Owned(tokenized, False),
            completion_only_loss=Owned(tokenized, None),
            dataset_kwargs=Owned(tokenized, None),
            dataset_num_proc=Default(None),
        )

    def memory_terms(self, recipe: "RecipeSpec", tokens: int, vocab: int) -> MemoryTerms:
        terms = MemoryTerms(rows=recipe.train.batch_size, tokens=tokens)
        if recipe.train.batch_size * tokens * vocab * 4 >= FUSED_HEAD_MIN_LOGIT_BYTES:
            terms.full_logits = False
            terms.notes.append("sft: logits over FUSED_HEAD_MIN_LOGIT_BYTES per micro batch: TRL's chunked LM head "
                               "keeps none (not measured)")
        return terms


    def build_trainer(self, recipe: "RecipeSpec", model: Any, tokenizer: Any, train_ds: Any, eval_ds: Any,
                      hooks: RunHooks) -> Any:
        """An SFTTrainer over tunelab-tokenized data (input_ids + labels)."""
        args = self.trl_config(recipe)
        trainer_cls = guarded_trainer(sft_trainer_class(), hooks.guards)
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            callbacks=hooks.trainer_callbacks(),
        )
        if args.packing and not uses_varlen_attention(model):
            # SDPA/eager: one padded row per packed row instead of TRL's single concatenated row (see collate.py)
            trainer.data_collator = PackedRowsCollator(tokenizer.pad_token_id, args.pad_to_multiple_of)
            # and on SDPA each packed example attends within itself at its own size, not through a row-wide mask
            use_packed_sdpa(model)
        return trainer

    def evaluate(self, model: Any, eval_ds: Any, recipe: "RecipeSpec", tokenizer: Any) -> dict[str, Any]:
        """Eval perplexity: exp of the mean NLL over every trained token of the eval rows."""
        bs = recipe.train.eval_batch_size or recipe.train.batch_size
        # packed like training: rows of max_length, batch_size of them per forward pass
        return perplexity(model, eval_ds, bs, tokenizer.pad_token_id or 0, pack_tokens=recipe.data.max_length)

    def report(self, before: dict[str, Any] | None, after: dict[str, Any], recipe: "RecipeSpec") -> tuple[list[str], dict[str, Any]]:
        if before is not None:
            line = f"eval perplexity: {before['perplexity']:.3f} (untrained) -> {after['perplexity']:.3f} (trained)"
        else:
            line = f"eval perplexity: {after['perplexity']:.3f}"
        return [line], {}


