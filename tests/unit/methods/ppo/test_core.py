"""PPO's formulas (methods/ppo/core.py) against independent computations on hand-made numbers.

The references are written as plain Python loops over float lists, straight from the
definitions, not from the vectorised code under test.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from tunelab.methods.ppo import core

ROWS = [  # (rewards, values, number of real tokens); positions past the length are padding
    ([0.1, -0.2, 0.0, 1.5], [0.3, 0.1, -0.4, 0.2], 4),
    ([0.0, 0.5, 2.0, 9.0], [1.0, -1.0, 0.5, 7.0], 3),
    ([-1.0, 3.0, 0.0, 0.0], [0.2, 0.2, 0.0, 0.0], 1),
]


def gae_reference(r: list[float], v: list[float], n: int, gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """A_t = Σ_l (γλ)^l δ_{t+l} over the n real tokens, δ_t = r_t + γ V_{t+1} - V_t, V_n = 0."""
    delta = [r[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t] for t in range(n)]
    adv = [sum((gamma * lam) ** (k - t) * delta[k] for k in range(t, n)) for t in range(n)]
    width = len(r)
    adv += [0.0] * (width - n)
    ret = [adv[t] + (v[t] if t < n else 0.0) for t in range(width)]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.5), (0.99, 0.0)])
def test_gae_matches_the_definition_with_padding(gamma: float, lam: float) -> None:
    rewards = torch.tensor([r for r, _, _ in ROWS], dtype=torch.float64)
    values = torch.tensor([v for _, v, _ in ROWS], dtype=torch.float64)
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(4)] for _, _, n in ROWS], dtype=torch.float64)
    adv, ret = core.gae(rewards, values, mask, gamma, lam)
    for j, (r, v, n) in enumerate(ROWS):
        want_adv, want_ret = gae_reference(r, v, n, gamma, lam)
        assert adv[j].tolist() == pytest.approx(want_adv, abs=1e-12)
        assert ret[j].tolist() == pytest.approx(want_ret, abs=1e-12)


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.5, -0.25, 2.0]], dtype=torch.float64)
    values = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    adv, ret = core.gae(rewards, values, torch.ones_like(rewards), 1.0, 1.0)
    assert adv[0].tolist() == pytest.approx([2.25 - 1.0, 1.75 - 0.0, 2.0 + 1.0])
    assert ret[0].tolist() == pytest.approx([2.25, 1.75, 2.0])


def test_token_rewards_put_the_score_on_the_last_real_token() -> None:
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    r = core.token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    assert r.flatten().tolist() == pytest.approx([-0.05, -0.1, -0.15 + 2.0, -0.25 - 1.0, 0.0, 0.0])


def test_whiten_uses_only_real_tokens() -> None:
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    real = [1.0, 2.0, 3.0, 4.0]
    mean = sum(real) / 4
    std = math.sqrt(sum((a - mean) ** 2 for a in real) / 3)  # Bessel-corrected
    out = core.whiten(x, mask)
    assert out[:, :2].flatten().tolist() == pytest.approx([(a - mean) / std for a in real], rel=1e-6)
    assert out[:, 2].tolist() == [0.0, 0.0]


def test_kl_estimators_match_their_formulas_and_the_true_kl() -> None:
    logp = torch.tensor([-1.0, -0.2, -3.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -0.1, -2.0], dtype=torch.float64)
    for i in range(3):
        lr = ref[i].item() - logp[i].item()
        assert core.kl_estimate(logp, ref, "k1")[i].item() == pytest.approx(-lr)
        assert core.kl_estimate(logp, ref, "k2")[i].item() == pytest.approx(lr * lr / 2)
        assert core.kl_estimate(logp, ref, "k3")[i].item() == pytest.approx(math.exp(lr) - 1 - lr)
    # unbiased: over samples a ~ p the means of k1 and k3 approach KL(p || q) of two categoricals
    p, q = [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    rng = random.Random(0)
    draws = rng.choices(range(3), weights=p, k=200_000)
    lp = torch.tensor([math.log(p[a]) for a in draws], dtype=torch.float64)
    lq = torch.tensor([math.log(q[a]) for a in draws], dtype=torch.float64)
    assert core.kl_estimate(lp, lq, "k1").mean().item() == pytest.approx(true_kl, abs=0.01)
    assert core.kl_estimate(lp, lq, "k3").mean().item() == pytest.approx(true_kl, abs=0.01)
    assert (core.kl_estimate(lp, lq, "k3") >= 0).all()


def clipped_reference(logp: float, old: float, adv: float, eps: float) -> float:
    ratio = math.exp(logp - old)
    return max(-adv * ratio, -adv * min(max(ratio, 1 - eps), 1 + eps))


@pytest.mark.parametrize("adv", [1.5, -0.7])
def test_clipped_surrogate_value_and_gradient_sign(adv: float) -> None:
    eps = 0.2
    old = torch.tensor([[-1.0, -1.0, -1.0]], dtype=torch.float64)
    # ratios 0.7 (below 1-ε), 1.05 (inside), 1.4 (above 1+ε)
    logp = (old + torch.log(torch.tensor([[0.7, 1.05, 1.4]], dtype=torch.float64))).requires_grad_(True)
    advantages = torch.full_like(old, adv)
    mask = torch.ones_like(old)
    loss, stats = core.policy_loss(logp, old, advantages, mask, eps)
    want = [clipped_reference(a, b, adv, eps) for a, b in zip(logp[0].tolist(), old[0].tolist())]
    assert loss.item() == pytest.approx(sum(want) / 3)
    loss.backward()
    g = logp.grad[0].tolist()
    # descent direction -g: raise log π where A > 0, lower it where A < 0, until the clip stops it
    assert g[1] * adv < 0  # inside the trust region the gradient always pushes
    if adv > 0:
        assert g[0] < 0 and g[2] == 0.0  # below 1-ε still pushed up; above 1+ε clipped (no gradient)
        assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    else:
        assert g[0] == 0.0 and g[2] > 0  # below 1-ε clipped; above 1+ε pushed down
        assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    # approx KL(π_old||π) = mean((ρ-1) - log ρ)
    want_kl = sum((r - 1) - math.log(r) for r in (0.7, 1.05, 1.4)) / 3
    assert stats["approx_kl"].item() == pytest.approx(want_kl)


def test_value_loss_with_and_without_clipping() -> None:
    v = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)
    old = torch.tensor([[0.0, 0.0, 2.5]], dtype=torch.float64)
    ret = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    plain, _ = core.value_loss(v, old, ret, mask, None)
    assert plain.item() == pytest.approx(0.5 * ((1 - 2) ** 2 + (0 - 1) ** 2) / 2)
    clipped, stats = core.value_loss(v, old, ret, mask, 0.2)
    # token 0: V moved 1.0 from old 0.0, clipped to 0.2: max((1-2)^2, (0.2-2)^2) = 3.24; token 1 unchanged
    assert clipped.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)
    assert stats["value_clipfrac"].item() == pytest.approx(0.5)


def test_entropy_of_categoricals() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.5, -1.0, 0.0]], dtype=torch.float64)
    out = core.entropy_from_logits(logits)
    for j, row in enumerate(logits.tolist()):
        z = sum(math.exp(a) for a in row)
        p = [math.exp(a) / z for a in row]
        assert out[j].item() == pytest.approx(-sum(pi * math.log(pi) for pi in p))
    assert out[0].item() == pytest.approx(math.log(4))


def test_explained_variance() -> None:
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones_like(ret)
    assert core.explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert core.explained_variance(torch.full_like(ret, 2.5), ret, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_moves_toward_the_target() -> None:
    fixed = core.AdaptiveKL(0.1, None, 100)
    fixed.update(5.0, 10)
    assert fixed.value == 0.1
    ctl = core.AdaptiveKL(0.1, target=1.0, horizon=100)
    ctl.update(3.0, 10)  # error clipped to +0.2: β *= 1 + 0.2 * 10/100
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(0.9, 10)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))
