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

from typing import Any

from tunelab.errors import Problem
from tunelab.methods.base import MemoryTerms, RunHooks
from tunelab.methods.online import OnlineRL
from tunelab.methods.ppo.block import PPOBlock
from tunelab.models.ref import resolve_model
from tunelab.patches.mla.block import mla_causal_only_problem
from tunelab.specs import RecipeSpec

__all__ = ["PPO", "PPOBlock"]


class PPO(OnlineRL[PPOBlock]):
    """PPO with our own trainer (methods/ppo/trainer.py): actor, critic, frozen reference, rewards."""

    name = "ppo"
    config = PPOBlock
    owns_checkpointing = True
    # PPO's loss is no divergence signal: its policy term is a surrogate of whitened advantages (about 0, either
    # sign), its value term grows with the reward's spread as the policy learns (quickstart: 0.03 -> 0.09 in 20
    # healthy steps), and a blown-up first step makes its first value huge (lr 0.99: 3636 at step 1), so no band
    # relative to it holds. Nor does approx_kl (251 at step 1, then 0 from a collapsed policy). What a broken
    # policy shows is its distance from the reference: the rollout's KL per completion token, measured before the
    # step's update, 0 at step 1 by construction (the policy starts as the reference). The healthy 80-step
    # quickstart run peaked at 0.25; the lr 0.99 run reached 7.17. With a first value of 0, the floor is the
    # band's scale: best + factor x 0.5, i.e. 1 nat per token at the default factor 2.
    divergence_metric = "kl_per_token"
    divergence_floor = 0.5
    refused_strategies = {
        "zero3": "rollouts generate with the whole policy and score with the reference on every rank; use zero2 "
                 "(offload: cpu for memory)",
        "fsdp2": "rollouts need the whole policy on every rank; use zero2 (offload: cpu for memory)",
    }

    def memory_terms(self, recipe: "RecipeSpec", tokens: int, vocab: int) -> MemoryTerms:
        m = self.block(recipe)
        s = tokens + m.max_completion_length
        b = m.micro_batch(recipe.train)[0]
        return MemoryTerms(rows=b, tokens=s, trained="policy", reference=bool(m.reference) or recipe.peft is None,
                           critic=True, reward_models=[r.model for r in m.rewards if r.model],
                           notes=[f"ppo: rows are prompt (max_length) + max_completion_length = {s} tokens, "
                                  f"{b} per forward"])


    def check(self, recipe: "RecipeSpec") -> list[Any]:
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
        # Method.check sees the recipe only: its model path is resolved again here (cheap, no weights), only for this
        if m.critic == "policy" and resolve_model(recipe.model.path, recipe.model.revision).kind == "mla":
            problems.append(mla_causal_only_problem("method.critic", recipe.model.path, " (the critic would be a "
                                                    "score-head copy of it)", "set method.critic to a reward model "
                                                    "run or an unconverted model"))
        return problems

    def build_trainer(self, recipe: "RecipeSpec", model: Any, tokenizer: Any, train_ds: Any, eval_ds: Any,
                      hooks: RunHooks) -> Any:
        """The PPO trainer over tunelab's prompt-only dataset (prompt, prompt_ids, extra columns)."""
        from tunelab.methods.ppo.trainer import PPOTrainer

        return PPOTrainer(recipe, model, tokenizer, train_ds, hooks)

    def trained_model(self, trainer: Any) -> Any:
        """The policy (the trainer's own model is the policy and critic as one module)."""
        return trainer.saved_model
