"""Direct preference optimisation on TRL's DPOTrainer: DPO, IPO and TRL's other pairwise losses.

DPO (Rafailov et al. 2023, eq. 7), with the reference model the seed notes leave out in their
short form:

    L = -log σ(β [(log πθ(y+|x) - log πref(y+|x)) - (log πθ(y-|x) - log πref(y-|x))])

where log π(y|x) sums the response tokens' log-probabilities. IPO (Azar et al. 2023, eq. 17)
regresses the same log-ratio difference h onto 1/(2τ), τ = ``beta``:

    L = (h - 1/(2β))^2

with h computed from length-averaged log-probabilities, as TRL does and as the IPO authors'
reported results use (the seed's form drops the reference and writes 1/β). With
``label_smoothing`` ε the sigmoid loss is conservative DPO (Mitchell 2023), for labels flipped
with probability ε: -(1-ε) log σ(βh) - ε log σ(-βh) (TRL 1.16 ignores ε there; see
``conservative_dpo``). The implicit reward of a response is β (log πθ(y|x) - log πref(y|x));
its chosen-minus-rejected mean is the "margin" metric. The reference is the starting weights: a frozen copy for full fine-tuning, the
same weights with the adapters disabled under PEFT (no second copy), or ``reference:`` a path.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from tunelab.data.collate import pad_right
from tunelab.eval.progress import progress
from tunelab.methods.base import MemoryTerms, RunHooks, TRLBlock, TRLMethod
from tunelab.methods.common import Default, Owned, Setting, guarded_trainer
from tunelab.models.load import frozen_reference
from tunelab.specs import ModelRef, RecipeSpec


# TRL 1.16's pairwise losses (DPOConfig.loss_type)
DPOLoss = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]

# the losses that read label_smoothing (TRL's, and sigmoid: conservative DPO, by tunelab)
SMOOTHED_LOSSES = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"})


class DPOBlock(TRLBlock):
    """Preference optimisation against a frozen reference: DPO (sigmoid), IPO and TRL's other pairwise losses."""

    name: Literal["dpo"] = Field(description="dpo: preference optimisation against a frozen reference")
    loss_type: DPOLoss | list[DPOLoss] = Field("sigmoid", description="one loss, or several combined with loss_weights")
    loss_weights: list[float] | None = Field(None, description="one weight per loss_type entry (default: all 1)")
    beta: float = Field(0.1, gt=0, description="KL strength (τ for IPO): larger keeps the policy nearer the reference")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="label-flip probability ε: conservative DPO "
                                   "(sigmoid), robust DPO; EXO's epsilon")
    reference: str | None = Field(None, description="explicit reference model (path or hub id); default: the "
                                  "starting weights (with PEFT: the base with adapters disabled)")
    precompute_ref_log_probs: bool = Field(False, description="score the data with the reference once, up front, "
                                           "and drop the reference from memory")

    def model_refs(self) -> list[ModelRef]:
        return [ModelRef("method.reference", self.reference, "reference", "causal")] if self.reference else []

    @property
    def losses(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @model_validator(mode="after")
    def _check(self) -> "DPOBlock":
        if isinstance(self.loss_type, list) and not self.loss_type:
            raise ValueError("loss_type: give at least one loss")
        if self.loss_weights is not None:
            if len(self.loss_weights) != len(self.losses):
                raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for {len(self.losses)} "
                                 "loss_type entries; give one weight per loss")
            if any(w < 0 for w in self.loss_weights):
                raise ValueError("loss_weights must not be negative")
        if self.label_smoothing > 0 and not set(self.losses) & SMOOTHED_LOSSES:
            raise ValueError(f"label_smoothing {self.label_smoothing} is read only by the losses "
                             f"{', '.join(sorted(SMOOTHED_LOSSES))}; loss_type {self.loss_type} would ignore it")
        if "exo_pair" in self.losses and self.label_smoothing == 0:
            raise ValueError("loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)")
        return self


def conservative_dpo(loss_types: list[str], weights: list[float], eps: float) -> tuple[list[str], list[float]]:
    """TRL's loss list and weights with every ``sigmoid`` entry made conservative DPO at label smoothing ``eps``.

    Conservative DPO (cDPO, Mitchell 2023; TRL's sigmoid loss before 1.0) assumes a label is flipped
    with probability ε: -(1-ε) log σ(βh) - ε log σ(-βh). TRL 1.16's sigmoid loss ignores
    label_smoothing, which would leave a recipe's ε silently unused. With TRL's robust loss at the
    same ε, R = (-(1-ε) log σ(βh) + ε log σ(-βh)) / (1-2ε), cDPO = 2(1-ε) sigmoid - (1-2ε) R, so
    the entry becomes that pair of TRL losses (the same per-pair mean and gradients).
    """
    types: list[str] = []
    out: list[float] = []
    for loss, w in zip(loss_types, weights, strict=True):
        if loss == "sigmoid" and eps > 0:
            types += ["sigmoid", "robust"]
            out += [2 * (1 - eps) * w, -(1 - 2 * eps) * w]
        else:
            types.append(loss)
            out.append(w)
    return types, out


def dpo_trainer_class() -> type:
    """TRL's DPOTrainer taking tunelab's tokenized pairs as they are, with the PEFT reference = base."""
    from trl import DPOTrainer

    class TunelabDPOTrainer(DPOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            model = self.accelerator.unwrap_model(self.model)
            if self.ref_model is None and "ref" in getattr(model, "peft_config", {}):
                # TRL keeps a copy of the starting adapter as the reference; ours are fresh (B = 0), so the
                # reference is the base: drop the copy and let TRL disable the adapters instead
                model.delete_adapter("ref")
                model.set_adapter("default")
            self.loss_types, self.loss_weights = conservative_dpo(self.loss_types, self.loss_weights,
                                                                  self.label_smoothing)

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
                return dataset  # tokenized, masked and length-checked by tunelab.data
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return TunelabDPOTrainer


def load_reference(recipe: "RecipeSpec", model: Any) -> Any:
    """The frozen reference model: ``method.reference``, else a copy of the starting weights (None under PEFT,
    where TRL disables the adapters, and with precompute_ref_log_probs, where it scores the data once up front)."""
    m = recipe.method
    assert isinstance(m, DPOBlock)
    return frozen_reference(recipe.model, model, m.reference, recipe.peft is None and not m.precompute_ref_log_probs)


# ---- evaluation on held-out pairs -------------------------------------------------------------


def pair_logps(model: Any, dataset: Any, batch_size: int, pad_id: int) -> dict[str, list[float]]:
    """Summed response log-probabilities log π(chosen|x), log π(rejected|x) of every pair."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    chosen: list[float] = []
    rejected: list[float] = []

    bar = progress(len(dataset), "eval pairs", "pair")
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            bar.update(len(rows))
            seqs = [r["prompt_ids"] + r[side] for side in ("chosen_ids", "rejected_ids") for r in rows]
            resp = [len(r[side]) for side in ("chosen_ids", "rejected_ids") for r in rows]
            ids, mask = pad_right(seqs, pad_id)
            width = ids.size(1)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -width:].float()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
            sums = [float(logp[j, len(s) - 1 - n : len(s) - 1].sum()) for j, (s, n) in enumerate(zip(seqs, resp))]
            chosen += sums[: len(rows)]
            rejected += sums[len(rows) :]
    bar.close()
    return {"chosen": chosen, "rejected": rejected}


class DPO(TRLMethod[DPOBlock]):
    """DPO, IPO and TRL's other pairwise losses on TRL's DPOTrainer, against a frozen reference."""

    name = "dpo"
    config = DPOBlock
    formats: ClassVar[tuple[str, ...]] = ("preference",)
    eval_before = True  # the margin needs the starting model's log-probs

    def trl_config_class(self) -> type:
        from trl import DPOConfig

        return DPOConfig

    def trl_fields(self, recipe: "RecipeSpec") -> dict[str, Setting]:
        m = self.block(recipe)
        return dict(
            # the pipeline already fits every pair; the collator cuts nothing
            max_length=Owned("data.max_length", recipe.data.max_length),
            beta=Owned("method.beta", m.beta),
            loss_type=Owned("method.loss_type", m.losses),
            loss_weights=Owned("method.loss_weights", m.loss_weights),
            label_smoothing=Owned("method.label_smoothing", m.label_smoothing),
            precompute_ref_log_probs=Owned("method.precompute_ref_log_probs", m.precompute_ref_log_probs),
            dataset_num_proc=Default(None),
        )

    def memory_terms(self, recipe: "RecipeSpec", tokens: int, vocab: int) -> MemoryTerms:
        m = self.block(recipe)
        rows = 2 * recipe.train.batch_size
        return MemoryTerms(rows=rows, tokens=tokens, trained="policy",
                           reference=bool(m.reference) or (recipe.peft is None and not m.precompute_ref_log_probs),
                           notes=[f"dpo: chosen and rejected in one forward: {rows} rows of up to {tokens} tokens"])


    def build_trainer(self, recipe: "RecipeSpec", model: Any, tokenizer: Any, train_ds: Any, eval_ds: Any,
                      hooks: RunHooks) -> Any:
        """A DPOTrainer over tunelab-tokenized pairs (prompt_ids, chosen_ids, rejected_ids)."""
        args = self.trl_config(recipe)
        ref = load_reference(recipe, model)
        trainer_cls = guarded_trainer(dpo_trainer_class(), hooks.guards)
        return trainer_cls(model=model, ref_model=ref, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                           processing_class=tokenizer, callbacks=hooks.trainer_callbacks())

    def evaluate(self, model: Any, eval_ds: Any, recipe: "RecipeSpec", tokenizer: Any) -> dict[str, Any]:
        """Per-pair log π(chosen) and log π(rejected) on the eval pairs, and their mean difference."""
        bs = recipe.train.eval_batch_size or recipe.train.batch_size
        lp = pair_logps(model, eval_ds, bs, tokenizer.pad_token_id or 0)
        n = len(lp["chosen"])
        return {"pairs": n, "logp_chosen": lp["chosen"], "logp_rejected": lp["rejected"],
                "mean_logratio": sum(c - r for c, r in zip(lp["chosen"], lp["rejected"])) / max(n, 1)}

    def report(self, before: dict[str, Any] | None, after: dict[str, Any], recipe: "RecipeSpec") -> tuple[list[str], dict[str, Any]]:
        """Lines to print and summary entries: implicit-reward margin against the starting model, log-ratio change."""
        out: dict[str, Any] = {"mean_logratio_after": after["mean_logratio"]}
        lines = []
        if before is not None:
            beta = self.block(recipe).beta
            margins = [beta * ((ac - bc) - (ar - br)) for ac, bc, ar, br in
                       zip(after["logp_chosen"], before["logp_chosen"], after["logp_rejected"], before["logp_rejected"])]
            out["mean_logratio_before"] = before["mean_logratio"]
            out["implicit_reward_margin"] = sum(margins) / max(len(margins), 1)
            out["implicit_reward_accuracy"] = sum(m > 0 for m in margins) / max(len(margins), 1)
            ref = "the starting model" + (" (not method.reference)" if self.block(recipe).reference else " (the reference)")
            lines.append(f"held-out implicit reward margin vs {ref}: {out['implicit_reward_margin']:+.4f} "
                         f"(positive on {out['implicit_reward_accuracy']:.0%} of {after['pairs']} pairs)")
            lines.append(f"held-out mean log π(chosen) - log π(rejected): {before['mean_logratio']:+.4f} (start) -> "
                         f"{after['mean_logratio']:+.4f} (trained)")
        else:
            lines.append(f"held-out mean log π(chosen) - log π(rejected): {after['mean_logratio']:+.4f}")
        return lines, out
