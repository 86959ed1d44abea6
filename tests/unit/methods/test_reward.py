"""Reward-model training (methods/reward.py): the pairwise loss and the centering term against the formulas.

The trainer tunelab builds is fed a stub model that returns hand-made rewards; the loss it computes must equal the
published formula evaluated independently in plain Python floats (atol 1e-6), on float64 tensors.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from tunelab.models.builtin import builtin_model, builtin_tokenizer
from tunelab.recipe.load import load_recipe
from tunelab.methods.base import RunHooks


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _pairs(n=4):
    return Dataset.from_dict({"prompt_ids": [[5, 6, 7]] * n, "chosen_ids": [[8, 9]] * n, "rejected_ids": [[10]] * n})


def _trainer(tmp_path, method: str, overrides=()):
    recipe = load_recipe(f"recipes/quickstart/{method}.yaml", [
        "model.path=builtin:tiny-llama", f"train.output_dir={tmp_path}", "train.report_to=[none]",
        "data.eval=[]", *overrides]).recipe
    from tunelab.methods import method_of

    module = method_of(recipe.method)
    model = builtin_model("tiny-llama", head=module.model_head)
    if module.model_head == "score":
        model.config.pad_token_id = 0
    return module.build_trainer(recipe, model, builtin_tokenizer(), _pairs(), None, RunHooks()), recipe


class StubReward(torch.nn.Module):
    def __init__(self, rewards):
        super().__init__()
        self.rewards = torch.nn.Parameter(torch.tensor(rewards, dtype=torch.float64)[:, None])

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.rewards)


R_CHOSEN, R_REJECTED, MARGINS = [1.5, -0.25, 0.75, 2.0], [0.5, 0.5, -1.25, 2.5], [0.0, 1.0, 0.5, 0.25]


@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_pairwise_loss_by_hand(tmp_path, with_margin):
    trainer, _ = _trainer(tmp_path, "reward")
    inputs = {"input_ids": torch.ones(8, 5, dtype=torch.long), "attention_mask": torch.ones(8, 5, dtype=torch.long)}
    if with_margin:
        inputs["margin"] = torch.tensor(MARGINS, dtype=torch.float64)
    ours = float(trainer.compute_loss(StubReward(R_CHOSEN + R_REJECTED), inputs))
    m = MARGINS if with_margin else [0.0] * 4
    expected = sum(-log_sigmoid(c - r - k) for c, r, k in zip(R_CHOSEN, R_REJECTED, m)) / 4
    assert ours == pytest.approx(expected, abs=1e-6)
    assert trainer._metrics["train"]["accuracy"][-1] == pytest.approx(0.5)  # pairs 0 and 2 are ordered right


def test_reward_centering_term_by_hand(tmp_path):
    trainer, _ = _trainer(tmp_path, "reward", ["method.center_rewards_coefficient=0.01"])
    inputs = {"input_ids": torch.ones(8, 5, dtype=torch.long), "attention_mask": torch.ones(8, 5, dtype=torch.long)}
    ours = float(trainer.compute_loss(StubReward(R_CHOSEN + R_REJECTED), inputs))
    pair = sum(-log_sigmoid(c - r) for c, r in zip(R_CHOSEN, R_REJECTED)) / 4
    center = 0.01 * sum((c + r) ** 2 for c, r in zip(R_CHOSEN, R_REJECTED)) / 4
    assert ours == pytest.approx(pair + center, abs=1e-6)
