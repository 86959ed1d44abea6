"""PPO for language models, our own trainer (TRL 1.x has none): actor, critic, reference, reward.

Seed 003/004 and Ouyang et al. 2022 / Ziegler et al. 2019. Four models:
- the policy (actor) πθ, trained;
- the critic V, a value head on a copy of the policy's body (or on the reward model), trained;
- the reference π_ref, frozen: the starting weights (under PEFT the same weights with the
  adapters disabled, no second copy), or ``reference:`` a path;
- the reward: reward functions and/or reward models (``rewards:``), frozen.

One step (methods/ppo/trainer.py, readable top to bottom): rollout -> per-token reward
r_t = -β·KL_t (+ the score on the last token) -> GAE(γ, λ) -> advantage whitening ->
``ppo_epochs`` passes over ``num_minibatches`` minibatches with the clipped surrogate (ε), the
(optionally clipped) value loss and an entropy bonus. The math lives in methods/ppo/core.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from tunelab.errors import Problem
from tunelab.methods.base import MemoryTerms, RunHooks
from tunelab.methods.online import OnlineRL, OnlineRLBlock
from tunelab.models.load import mla_checkpoint
from tunelab.patches.mla.block import mla_causal_only_problem
from tunelab.specs import ModelRef, TrainSpec

if TYPE_CHECKING:
    from tunelab.recipe.schema import Recipe


class PPOBlock(OnlineRLBlock):
    """Proximal policy optimisation with a learned critic and a KL penalty to the reference."""

    name: Literal["ppo"] = Field(description="ppo: proximal policy optimisation with a critic")
    critic: str = Field("policy", description="policy: value head on a copy of the policy's body; reward_model: "
                        "start from the (first) reward model in rewards; or a path to a model to start from")
    critic_learning_rate: float | None = Field(None, gt=0, lt=1, description="default: train.learning_rate")
    reference: str | None = Field(None, description="explicit reference model; default: the starting weights")
    kl_coef: float = Field(0.05, ge=0, description="β of the per-token KL penalty (the start value if adaptive)")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="per-token KL(π||π_ref) estimator")
    target_kl: float | None = Field(None, gt=0, description="adapt β toward this KL per sequence (Ziegler et al.)")
    kl_horizon: int = Field(10000, ge=1, description="horizon of the adaptive KL controller, in samples")
    gamma: float = Field(1.0, ge=0, le=1, description="discount γ")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ")
    clip: float = Field(0.2, gt=0, lt=1, description="ε of the clipped surrogate")
    value_clip: float | None = Field(0.2, gt=0, description="clip the value update to old ± this; null: no clipping")
    entropy_coef: float = Field(0.0, ge=0, description="weight of the entropy bonus")
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout batch")
    num_minibatches: int = Field(1, ge=1, description="optimizer steps per pass (the rollout batch is split)")
    whiten_advantages: bool = Field(True, description="normalise the advantages of each rollout batch to mean 0, std 1")
    missing_eos_penalty: float | None = Field(None, ge=0, description="subtract this from the score of a "
                                              "completion that hit max_completion_length without EOS")
    score_clip: float | None = Field(None, gt=0, description="clip the sequence score to ±this")
    save_critic: bool = Field(False, description="also save the critic to final/critic")

    def micro_batch(self, train: TrainSpec) -> tuple[int, int]:
        """One optimizer step per minibatch of a rollout: batch_size / num_minibatches, no accumulation."""
        return max(1, train.batch_size // self.num_minibatches), 1

    def model_refs(self) -> list[ModelRef]:
        refs = [ModelRef("method.reference", self.reference, "reference", "causal")] if self.reference else []
        if self.critic not in ("policy", "reward_model"):
            refs.append(ModelRef("method.critic", self.critic, "critic", "score"))
        return refs + super().model_refs()

    @model_validator(mode="after")
    def _critic_source(self) -> "PPOBlock":
        if self.critic == "reward_model" and not any(r.model for r in self.rewards):
            raise ValueError("critic: reward_model needs a reward model in rewards (- model: PATH)")
        return self


class PPO(OnlineRL[PPOBlock]):
    """PPO with our own trainer (methods/ppo/trainer.py): actor, critic, frozen reference, rewards."""

    name = "ppo"
    config = PPOBlock
    owns_checkpointing = True
    refused_strategies = {
        "zero3": "rollouts generate with the whole policy and score with the reference on every rank; use zero2 "
                 "(offload: cpu for memory)",
        "fsdp2": "rollouts need the whole policy on every rank; use zero2 (offload: cpu for memory)",
    }

    def memory_terms(self, recipe: "Recipe", tokens: int, vocab: int) -> MemoryTerms:
        m = self.block(recipe)
        s = tokens + m.max_completion_length
        b = m.micro_batch(recipe.train)[0]
        return MemoryTerms(rows=b, tokens=s, trained="policy", reference=bool(m.reference) or recipe.peft is None,
                           critic=True, reward_models=[r.model for r in m.rewards if r.model],
                           notes=[f"ppo: rows are prompt (max_length) + max_completion_length = {s} tokens, "
                                  f"{b} per forward"])



    def check(self, recipe: "Recipe") -> list[Any]:
        """Recipe checks PPO needs beyond the schema (problems, before any weights load)."""
        problems = super().check(recipe)
        m = self.block(recipe)
        if recipe.train.batch_size % m.num_minibatches:
            problems.append(Problem("method.num_minibatches", f"train.batch_size={recipe.train.batch_size} does not "
                                    f"split into {m.num_minibatches} equal minibatches", "pick a divisor"))
        if recipe.train.grad_accum != 1:
            problems.append(Problem("train.grad_accum", "PPO takes its batch from train.batch_size (prompts per rollout) "
                                    "and method.num_minibatches", "set train.grad_accum: 1"))
        if recipe.peft is not None and recipe.peft.method not in ("lora", "dora", "qlora"):
            problems.append(Problem("peft.method", f"PPO supports LoRA-style adapters, not {recipe.peft.method}",
                                    "use lora, dora or qlora"))
        if m.critic == "policy" and mla_checkpoint(recipe.model.path):
            problems.append(mla_causal_only_problem("method.critic", recipe.model.path, " (the critic would be a "
                                                    "score-head copy of it)", "set method.critic to a reward model "
                                                    "run or an unconverted model"))
        return problems

    def build_trainer(self, recipe: "Recipe", model: Any, tokenizer: Any, train_ds: Any, eval_ds: Any,
                      hooks: RunHooks) -> Any:
        """The PPO trainer over tunelab's prompt-only dataset (prompt, prompt_ids, extra columns)."""
        from tunelab.methods.ppo.trainer import PPOTrainer

        return PPOTrainer(recipe, model, tokenizer, train_ds, hooks)

    def trained_model(self, trainer: Any) -> Any:
        """The policy (the trainer's own model is the policy and critic as one module)."""
        return trainer.saved_model
