"""Reward-model, DPO and IPO losses: our training path against the formulas, on hand-made log-probs.

The trainers tunelab builds are fed a stub model that returns hand-made per-token log-probs
(DPO/IPO) or rewards (reward model); the loss they compute must equal the published formula
evaluated independently in plain Python floats (atol 1e-6). The hand-made tensors are float64
so that the comparison measures the formula, not float32 rounding.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from tunelab.models.builtin import builtin_model, builtin_tokenizer
from tunelab.recipe.load import load_recipe


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
    return module.build_trainer(recipe, model, builtin_tokenizer(), _pairs(), None, []), recipe


# Hand-made batch: 3 pairs. Per-token log-probs of each response token, for policy and reference.
PROMPTS = [[11, 12, 13], [14, 15], [16, 17, 18, 19]]
CHOSEN = [[-0.5, -1.25, -0.75], [-2.0, -0.25], [-0.1]]
REJECTED = [[-1.5, -2.5], [-0.75, -1.0, -3.0, -0.5], [-4.0, -0.2]]
REF_CHOSEN = [-3.0, -2.5, -0.3]
REF_REJECTED = [-3.5, -5.0, -3.9]


class StubPolicy(torch.nn.Module):
    """Returns the hand-made per-token log-probs where the completion mask is set (0 elsewhere), like TRL's fused head."""

    def __init__(self, per_token: torch.Tensor):
        super().__init__()
        self.per_token = torch.nn.Parameter(per_token)

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=True, **kwargs):
        mask = (labels[:, 1:] != -100).to(self.per_token.dtype)
        zeros = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token * mask, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros_like(mask, dtype=torch.bool))


def _dpo_batch():
    seqs, comp, lps = [], [], []
    for side in (CHOSEN, REJECTED):
        for prompt, resp in zip(PROMPTS, side):
            seqs.append(prompt + [20 + j for j in range(len(resp))])
            comp.append([0] * len(prompt) + [1] * len(resp))
            lps.append([0.0] * (len(prompt) - 1) + resp)  # position t scores token t+1
    width = max(map(len, seqs))
    pad = lambda rows, v: torch.tensor([r + [v] * (width - len(r)) for r in rows])  # noqa: E731
    inputs = {"input_ids": pad(seqs, 0), "attention_mask": pad([[1] * len(s) for s in seqs], 0),
              "completion_mask": pad(comp, 0), "ref_chosen_logps": torch.tensor(REF_CHOSEN, dtype=torch.float64),
              "ref_rejected_logps": torch.tensor(REF_REJECTED, dtype=torch.float64)}
    per_token = torch.tensor([r + [0.0] * (width - 1 - len(r)) for r in lps], dtype=torch.float64)
    return inputs, per_token


def _our_dpo_loss(tmp_path, overrides):
    trainer, recipe = _trainer(tmp_path, "dpo", overrides)
    trainer.precompute_ref_logps = True  # take the reference log-probs from the batch
    inputs, per_token = _dpo_batch()
    loss = trainer.compute_loss(StubPolicy(per_token), inputs)
    return float(loss.detach()), trainer, recipe


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_loss_by_hand(tmp_path, beta):
    ours, trainer, _ = _our_dpo_loss(tmp_path, ["method.loss_type=sigmoid", f"method.beta={beta}"])
    losses, margins = [], []
    for c, r, rc, rr in zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED):
        z = beta * ((sum(c) - rc) - (sum(r) - rr))
        losses.append(-log_sigmoid(z))
        margins.append(z)
    assert ours == pytest.approx(sum(losses) / len(losses), abs=1e-6)
    # the logged implicit-reward margin is β times the log-ratio difference
    assert trainer._metrics["train"]["rewards/margins"][-1] == pytest.approx(sum(margins) / 3, abs=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_loss_by_hand(tmp_path, beta):
    """IPO (Azar et al. 2023, eq. 17) with length-averaged log-ratios: (h - 1/(2β))^2."""
    ours, _, _ = _our_dpo_loss(tmp_path, ["method.loss_type=ipo", f"method.beta={beta}"])
    losses = []
    for c, r, rc, rr in zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED):
        h = (sum(c) - rc) / len(c) - (sum(r) - rr) / len(r)
        losses.append((h - 1 / (2 * beta)) ** 2)
    assert ours == pytest.approx(sum(losses) / len(losses), abs=1e-6)


def test_weighted_loss_mix_by_hand(tmp_path):
    ours, _, _ = _our_dpo_loss(tmp_path, ["method.loss_type=[sigmoid, ipo]", "method.loss_weights=[0.8, 0.2]",
                                          "method.beta=0.2"])
    sig, ipo = [], []
    for c, r, rc, rr in zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED):
        sig.append(-log_sigmoid(0.2 * ((sum(c) - rc) - (sum(r) - rr))))
        ipo.append(((sum(c) - rc) / len(c) - (sum(r) - rr) / len(r) - 1 / 0.4) ** 2)
    assert ours == pytest.approx(0.8 * sum(sig) / 3 + 0.2 * sum(ipo) / 3, abs=1e-6)


def test_dpo_loss_depends_on_reference(tmp_path):
    """Guard that the reference terms are really used: shifting one reference log-prob changes the loss."""
    ours, trainer, _ = _our_dpo_loss(tmp_path, ["method.loss_type=sigmoid"])
    inputs, per_token = _dpo_batch()
    inputs["ref_chosen_logps"] = inputs["ref_chosen_logps"] + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert float(trainer.compute_loss(StubPolicy(per_token), inputs)) != pytest.approx(ours, abs=1e-4)


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
