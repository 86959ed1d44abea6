"""PPO's recipe block (``method: {name: ppo, ...}``): a module of its own so that the trainer reads its type
without importing the method object that builds the trainer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunelab.methods.online import OnlineRLBlock
from tunelab.specs import ModelRef, TrainSpec


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
