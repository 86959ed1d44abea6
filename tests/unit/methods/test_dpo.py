"""DPO (methods/dpo.py): the reference model (PEFT keeps one copy of the base and scores the reference with adapters
disabled; a frozen copy otherwise; precomputed or explicit), and the DPO, IPO, hinge, robust and conservative
(label-smoothed) DPO losses against the formulas and against a stock TRL DPOTrainer.

The losses: the trainer tunelab builds is fed a stub model that returns hand-made per-token log-probs; the loss it
computes must equal the published formula evaluated independently in plain Python floats (atol 1e-6). The
hand-made tensors are float64 so that the comparison measures the formula, not float32 rounding.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from trl.trainer.dpo_trainer import DataCollatorForPreference

from tunelab.methods import METHODS

build_trainer = METHODS["dpo"].build_trainer
from tunelab.models.builtin import builtin_model, builtin_tokenizer  # noqa: E402
from tunelab.models.peft import apply_peft  # noqa: E402
from tunelab.recipe.load import load_recipe  # noqa: E402
from tunelab.methods.base import RunHooks

PAIRS = {"prompt_ids": [[5, 6, 7, 8], [9, 10]], "chosen_ids": [[11, 12, 13], [14]], "rejected_ids": [[15], [16, 17]]}


def _recipe(tmp_path, *extra):
    return load_recipe("recipes/quickstart/dpo.yaml", [
        "model.path=builtin:tiny-llama", f"train.output_dir={tmp_path}", "train.report_to=[none]", "data.eval=[]",
        *extra]).recipe


def _summed_logps(model, batch):
    """Σ log p(response tokens) of each row, computed directly from the logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (logp * batch["completion_mask"][:, 1:]).sum(1)


def test_peft_dpo_keeps_one_copy_and_reference_is_base(tmp_path):
    recipe = _recipe(tmp_path, "peft={method: lora, r: 4, alpha: 8, target_modules: all-linear}")
    tok = builtin_tokenizer()
    model = apply_peft(builtin_model("tiny-llama"), recipe.peft, tok)
    trainer = build_trainer(recipe, model, tok, Dataset.from_dict(PAIRS), None, RunHooks())

    # no reference model and no reference adapter: the reference is the base with adapters disabled
    assert trainer.ref_model is None
    assert list(trainer.model.peft_config) == ["default"]
    base_numel = sum(p.numel() for p in builtin_model("tiny-llama").parameters())
    held = {p.data_ptr(): (n, p.numel()) for n, p in trainer.model.named_parameters()}
    lora = sum(k for n, k in held.values() if "lora_" in n)
    assert sum(k for _, k in held.values()) - lora == base_numel  # one copy of the base weights

    # make the policy differ from the base, then score the reference
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    batch = DataCollatorForPreference(pad_token_id=0)([{k: PAIRS[k][i] for k in PAIRS} for i in range(2)])
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    expected = _summed_logps(builtin_model("tiny-llama").eval(), batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]).double(), expected, atol=1e-4, rtol=1e-5)
    policy = _summed_logps(trainer.model.eval(), batch)
    assert not torch.allclose(policy, expected, atol=1e-2)  # guard: the adapters do change the policy


def test_full_finetune_reference_is_a_frozen_copy_of_the_start(tmp_path):
    recipe = _recipe(tmp_path)
    model = builtin_model("tiny-llama")
    trainer = build_trainer(recipe, model, builtin_tokenizer(), Dataset.from_dict(PAIRS), None, RunHooks())
    ref = trainer.ref_model
    assert ref is not None and ref is not trainer.model
    assert all(not p.requires_grad for p in ref.parameters())
    for (n, a), (_, b) in zip(trainer.model.named_parameters(), ref.named_parameters()):
        assert a.data_ptr() != b.data_ptr() and torch.equal(a, b), n


def test_precompute_and_explicit_reference(tmp_path):
    ref_dir = tmp_path / "ref"
    builtin_model("tiny-qwen2").save_pretrained(ref_dir)
    recipe = _recipe(tmp_path / "a", f"method.reference={ref_dir}")
    trainer = build_trainer(recipe, builtin_model("tiny-llama"), builtin_tokenizer(), Dataset.from_dict(PAIRS), None, RunHooks())
    assert type(trainer.ref_model).__name__ == "Qwen2ForCausalLM"

    recipe = _recipe(tmp_path / "b", "method.precompute_ref_log_probs=true")
    trainer = build_trainer(recipe, builtin_model("tiny-llama"), builtin_tokenizer(), Dataset.from_dict(PAIRS), None, RunHooks())
    assert trainer.ref_model is None
    batch = DataCollatorForPreference(pad_token_id=0)([{k: PAIRS[k][i] for k in PAIRS} for i in range(2)])
    expected = _summed_logps(builtin_model("tiny-llama").eval(), batch)
    got = torch.tensor(list(trainer.train_dataset["ref_chosen_logps"]) + list(trainer.train_dataset["ref_rejected_logps"]))
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-5)


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


def _h(c, r, rc, rr) -> float:
    """The log-ratio difference h = (log π(y+) - log πref(y+)) - (log π(y-) - log πref(y-)) of one pair."""
    return (sum(c) - rc) - (sum(r) - rr)


PAIRS_BY_HAND = list(zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED))  # h = 1.0, 0.5, 0.5


@pytest.mark.parametrize("beta", [0.1, 1.5])
def test_hinge_loss_by_hand(tmp_path, beta):
    """SLiC's hinge (Zhao et al. 2023) on the DPO log-ratios: relu(1 - β h); at β 1.5 one pair is past the margin."""
    ours, trainer, _ = _our_dpo_loss(tmp_path, ["method.loss_type=hinge", f"method.beta={beta}"])
    losses = [max(0.0, 1 - beta * _h(*pair)) for pair in PAIRS_BY_HAND]
    assert (0.0 in losses) == (beta == 1.5)  # guard: both sides of the hinge are exercised
    assert ours == pytest.approx(sum(losses) / len(losses), abs=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_robust_loss_by_hand(tmp_path, eps):
    """Robust DPO (Chowdhury et al. 2024, eq. 8), ε = label_smoothing, the probability that a label is flipped:
    (-(1-ε) log σ(β h) + ε log σ(-β h)) / (1 - 2ε), unbiased for the clean-label DPO loss."""
    beta = 0.5
    ours, _, _ = _our_dpo_loss(tmp_path, ["method.loss_type=robust", f"method.beta={beta}",
                                          f"method.label_smoothing={eps}"])
    losses = [(-(1 - eps) * log_sigmoid(beta * _h(*p)) + eps * log_sigmoid(-beta * _h(*p))) / (1 - 2 * eps)
              for p in PAIRS_BY_HAND]
    assert ours == pytest.approx(sum(losses) / len(losses), abs=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.25])
def test_sigmoid_with_label_smoothing_is_conservative_dpo_by_hand(tmp_path, eps):
    """sigmoid + label_smoothing ε is conservative DPO (cDPO, Mitchell 2023; TRL's sigmoid loss before 1.x):
    -(1-ε) log σ(β h) - ε log σ(-β h). TRL 1.16's sigmoid ignores label_smoothing; tunelab's trainer must not."""
    beta = 0.5
    ours, trainer, _ = _our_dpo_loss(tmp_path, ["method.loss_type=sigmoid", f"method.beta={beta}",
                                                f"method.label_smoothing={eps}"])
    losses = [-(1 - eps) * log_sigmoid(beta * _h(*p)) - eps * log_sigmoid(-beta * _h(*p)) for p in PAIRS_BY_HAND]
    assert ours == pytest.approx(sum(losses) / len(losses), abs=1e-6)
    plain = [-log_sigmoid(beta * _h(*p)) for p in PAIRS_BY_HAND]
    assert abs(sum(losses) - sum(plain)) / 3 > 1e-2  # guard: ε changes the loss well beyond the tolerance
    # the gradients too: d/dh of the pair's loss is β (-(1-ε) σ(-βh) + ε σ(βh)), and each response token's
    # log-prob enters h with +1 (chosen) or -1 (rejected)
    inputs, per_token = _dpo_batch()
    policy = StubPolicy(per_token)
    trainer.compute_loss(policy, inputs).backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for i, (c, r, _, _) in enumerate(PAIRS_BY_HAND):
        h = _h(*PAIRS_BY_HAND[i])
        dh = beta * (-(1 - eps) * sig(-beta * h) + eps * sig(beta * h)) / 3
        grad_c, grad_r = policy.per_token.grad[i], policy.per_token.grad[3 + i]
        assert grad_c[grad_c != 0].tolist() == pytest.approx([dh] * len(c), abs=1e-9)
        assert grad_r[grad_r != 0].tolist() == pytest.approx([-dh] * len(r), abs=1e-9)


@pytest.mark.parametrize(("loss_type", "eps"), [("hinge", 0.0), ("robust", 0.2), ("sigmoid", 0.0)])
def test_losses_equal_trls_own_dpo_trainer(tmp_path, loss_type, eps):
    """The recipe's loss_type, beta and label_smoothing reach TRL: a stock trl.DPOTrainer given the same DPOConfig
    values computes the same loss on the same tensors (where TRL implements the loss; cDPO is tunelab's)."""
    from trl import DPOConfig, DPOTrainer

    beta = 0.3
    ours, trainer, _ = _our_dpo_loss(tmp_path / "ours", [f"method.loss_type={loss_type}", f"method.beta={beta}",
                                                         f"method.label_smoothing={eps}"])
    assert (trainer.loss_types, trainer.beta, trainer.label_smoothing) == ([loss_type], beta, eps)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=loss_type, beta=beta, label_smoothing=eps,
                     report_to="none", use_cpu=True, bf16=False)
    stock = DPOTrainer(model=builtin_model("tiny-llama"), ref_model=builtin_model("tiny-llama"), args=args,
                       train_dataset=Dataset.from_dict({"prompt": ["a b"], "chosen": [" c"], "rejected": [" d"]}),
                       processing_class=builtin_tokenizer())
    assert type(stock) is DPOTrainer
    stock.precompute_ref_logps = True
    inputs, per_token = _dpo_batch()
    theirs = float(stock.compute_loss(StubPolicy(per_token), inputs).detach())
    assert ours == pytest.approx(theirs, abs=1e-9)


def test_label_smoothing_no_loss_reads_is_refused(tmp_path):
    """hinge, ipo, ... ignore label_smoothing in TRL: a recipe setting it there is refused, not trained without it."""
    from tunelab.errors import RecipeError
    from tunelab.recipe.validate import validate

    with pytest.raises(RecipeError, match="label_smoothing 0.1 is read only by the losses aot, aot_unpaired"):
        validate("recipes/quickstart/dpo.yaml", ["model.path=builtin:tiny-llama", f"train.output_dir={tmp_path}",
                                                 "method.loss_type=hinge", "method.label_smoothing=0.1"])
    _recipe(tmp_path, "method.loss_type=[hinge, robust]", "method.label_smoothing=0.1")  # robust reads it
