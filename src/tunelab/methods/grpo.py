"""GRPO on TRL's GRPOTrainer, with tunelab's reward functions and prompt-only data.

Group relative policy optimisation (Shao et al. 2024, DeepSeekMath; seed 004): for each
prompt sample a group of G = ``num_generations`` completions, score them, and use the
group-normalised reward as every token's advantage,

    A_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G)        (``scale_rewards: group``)

in PPO's clipped surrogate (ε = ``epsilon``, optionally ``epsilon_high`` as in DAPO), with
no critic; ``beta`` > 0 adds a k3 KL penalty to the reference (the starting weights; with
PEFT the base with adapters disabled). ``scale_rewards: batch`` divides by the batch std,
``none`` only centres (Dr. GRPO). ``loss_type`` picks how token losses are averaged.

Batch sizes are counted in completions, as in TRL: ``train.batch_size`` completions per device
per micro-step; ``batch_size * grad_accum * processes`` must be a multiple of
``num_generations``. Generation uses vLLM when it is installed and a GPU is present
(``generation: auto``), transformers' ``generate`` otherwise.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tunelab.errors import Problem
from tunelab.methods.base import MemoryTerms, RunHooks, TRLBlock, TRLMethod
from tunelab.methods.common import Owned, Setting, guarded_trainer
from tunelab.methods.online import OnlineRL, OnlineRLBlock
from tunelab.rewards.compute import build_rewards, trl_reward_funcs
from tunelab.specs import RecipeSpec


GRPOLoss = Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"]


class GRPOBlock(OnlineRLBlock, TRLBlock):
    """Group relative policy optimisation on TRL's GRPOTrainer."""

    name: Literal["grpo"] = Field(description="grpo: group relative policy optimisation")
    num_generations: int = Field(8, ge=2, description="completions sampled per prompt (the group)")
    beta: float = Field(0.0, ge=0, description="KL coefficient to the reference; 0 loads no reference")
    epsilon: float = Field(0.2, gt=0, lt=1, description="lower clip ε of the ratio")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip (DAPO's clip-higher); default: epsilon")
    loss_type: GRPOLoss = Field("dapo", description="how token losses are aggregated (TRL's names)")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="divide the centred reward "
                                                             "by the group std, the batch std, or nothing")
    num_iterations: int = Field(1, ge=1, description="optimisation passes per generated batch (μ)")
    mask_truncated_completions: bool = Field(False, description="no loss on completions cut at max_completion_length")
    generation: Literal["auto", "vllm", "transformers"] = Field("auto", description="auto: vLLM when installed "
                                                                "and a GPU is present, else transformers")

    @model_validator(mode="after")
    def _check(self) -> "GRPOBlock":
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise ValueError("epsilon_high is smaller than epsilon; it is the upper clip (1 + epsilon_high)")
        return self


def use_vllm(m: GRPOBlock) -> bool:
    """vLLM for generation: asked for, or ``auto`` with vLLM importable and a CUDA GPU."""
    if m.generation != "auto":
        return m.generation == "vllm"
    import importlib.util

    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


class GRPO(OnlineRL[GRPOBlock], TRLMethod[GRPOBlock]):
    """GRPO on TRL's GRPOTrainer with tunelab's reward functions and prompt-only data."""

    name = "grpo"
    config = GRPOBlock
    # GRPO's logged loss is the clipped surrogate of group-centred advantages: about 0 at every step by
    # construction, whether the policy learns or breaks, so it has no band to leave. (Its KL and reward are
    # where a broken run shows; the non-finite guard still runs.)
    divergence_metric = None

    def trl_config_class(self) -> type:
        from trl import GRPOConfig

        return GRPOConfig

    def trl_fields(self, recipe: "RecipeSpec") -> dict[str, Setting]:
        m = self.block(recipe)
        return dict(
            num_generations=Owned("method.num_generations", m.num_generations),
            max_completion_length=Owned("method.max_completion_length", m.max_completion_length),
            temperature=Owned("method.temperature", m.temperature),
            top_p=Owned("method.top_p", m.top_p),
            beta=Owned("method.beta", m.beta),
            epsilon=Owned("method.epsilon", m.epsilon),
            epsilon_high=Owned("method.epsilon_high", m.epsilon_high),
            loss_type=Owned("method.loss_type", m.loss_type),
            scale_rewards=Owned("method.scale_rewards", m.scale_rewards),
            num_iterations=Owned("method.num_iterations", m.num_iterations),
            mask_truncated_completions=Owned("method.mask_truncated_completions", m.mask_truncated_completions),
            reward_weights=Owned("method.rewards", [r.weight for r in m.rewards]),
            use_vllm=Owned("method.generation", use_vllm(m)),
            # extra columns go to the reward functions
            remove_unused_columns=Owned("tunelab: the reward functions read the data's extra columns", False),
            # held-out evaluation is tunelab's own (methods/online.py)
            eval_strategy=Owned("tunelab: held-out evaluation of online RL is tunelab's own (data.eval)", "no"),
        )

    def memory_terms(self, recipe: "RecipeSpec", tokens: int, vocab: int) -> MemoryTerms:
        m = self.block(recipe)
        s = tokens + m.max_completion_length
        b = recipe.train.batch_size
        return MemoryTerms(rows=b, tokens=s, trained="policy", reference=recipe.peft is None and m.beta > 0,
                           notes=[f"grpo: rows are prompt (max_length) + max_completion_length = {s} tokens, "
                                  f"{b} per forward"])


    def check(self, recipe: "RecipeSpec") -> list[Any]:
        """GRPO's batch arithmetic and generation backend, before any weights load."""
        problems = super().check(recipe)
        import importlib.util

        m = self.block(recipe)
        completions = recipe.train.batch_size * recipe.train.grad_accum
        if completions % m.num_generations:
            problems.append(Problem("method.num_generations", f"train.batch_size x train.grad_accum = {completions} "
                                    f"completions is not a multiple of num_generations={m.num_generations}",
                                    "make batch_size x grad_accum a multiple of the group size"))
        if m.generation == "vllm" and importlib.util.find_spec("vllm") is None:
            problems.append(Problem("method.generation", "vllm is not installed", "pip install vllm, or use auto"))
        return problems

    def build_trainer(self, recipe: "RecipeSpec", model: Any, tokenizer: Any, train_ds: Any, eval_ds: Any,
                      hooks: RunHooks) -> Any:
        """TRL's GRPOTrainer on the prompt column (+ extra columns for the rewards), left-padded prompts."""
        from trl import GRPOTrainer

        tokenizer.padding_side = "left"
        funcs = trl_reward_funcs(build_rewards(self.block(recipe).rewards))
        trainer_cls = guarded_trainer(GRPOTrainer, hooks.guards)
        return trainer_cls(model=model, reward_funcs=funcs, args=self.trl_config(recipe),
                           train_dataset=train_ds.remove_columns(["prompt_ids"]), processing_class=tokenizer,
                           callbacks=hooks.trainer_callbacks())
