"""distributed/faults.py on hand-made tensors and in one process: the non-finite check, skip and stop, the
preemption flag set by a real signal, the preempted.json marker. The end-to-end runs are in
tests/integration/test_faults.py."""

import json
import os
import signal

import pytest
import torch

from tunelab.distributed.faults import (
    REQUEUE_EXIT,
    NonFiniteError,
    NonFiniteGuard,
    PreemptionGuard,
    grads_finite,
    write_preempted,
)


def _params(*grads):
    out = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        out.append(p)
    return out


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_grads_finite_finds_one_bad_element_in_any_tensor(bad):
    ok = [torch.randn(3, 4), torch.randn(7)]
    assert grads_finite(_params(*ok))
    broken = ok[1].clone()
    broken[5] = bad
    assert not grads_finite(_params(ok[0], broken))
    assert grads_finite([torch.nn.Parameter(torch.ones(2))])  # no gradient at all: nothing to check


def test_skip_drops_the_update_and_leaves_weights_and_adam_moments_alone():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.randn(4)
    opt.step()  # a first good step: moments exist
    before_w, before_m = w.detach().clone(), opt.state[w]["exp_avg"].clone()
    guard = NonFiniteGuard("skip")
    w.grad = torch.tensor([1.0, float("nan"), 0.0, 2.0])
    assert guard.check([w], step=2) is False
    opt.step()
    assert torch.equal(w.detach(), before_w) and torch.equal(opt.state[w]["exp_avg"], before_m)
    assert guard.skipped == [2]
    w.grad = torch.ones(4)
    assert guard.check([w], step=3) is True and guard.skipped == [2]


def test_stop_raises_naming_the_step():
    with pytest.raises(NonFiniteError, match=r"^step 17: .*on_nonfinite: skip"):
        NonFiniteGuard("stop").check(_params(torch.tensor([float("inf")])), step=17)


def test_preemption_flag_is_set_by_sigterm_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    guard = PreemptionGuard().install()
    try:
        assert not guard.requested()
        os.kill(os.getpid(), signal.SIGTERM)  # the process goes on: the step ends, then the checkpoint
        assert guard.requested() and guard.signal == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal changes nothing
        assert guard.signal == signal.SIGTERM
    finally:
        guard.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before


def test_preempted_marker(tmp_path):
    path = write_preempted(tmp_path, 12, tmp_path / "checkpoint-12", signal.SIGTERM)
    got = json.loads(path.read_text())
    assert (got["step"], got["checkpoint"], got["signal"]) == (12, str(tmp_path / "checkpoint-12"), "SIGTERM")
    assert REQUEUE_EXIT == 75


# ---- the divergence guard (train.on_divergence), on hand-made loss curves --------------------------------------


def _feed(guard, losses, start=1, key="loss"):
    for i, loss in enumerate(losses, start):
        guard.observe(i, {key: loss})


def test_divergence_rule_band_is_best_plus_factor_times_the_first_loss():
    """loss > best + factor * |first| for `patience` logs in a row: computed here by hand for a climbing run."""
    from tunelab.distributed.faults import DivergenceGuard
    from tunelab.errors import Diverged

    guard = DivergenceGuard("stop", factor=2.0, patience=3)
    _feed(guard, [7.4, 6.0, 5.0])  # learning: best 5.0, band 5.0 + 2 * 7.4 = 19.8
    assert guard.band() == pytest.approx(19.8)
    guard.observe(4, {"loss": 19.8})  # on the band is in band
    guard.observe(5, {"loss": 25.0})
    guard.observe(6, {"loss": 30.0})
    with pytest.raises(Diverged) as exc:
        guard.observe(7, {"loss": 95.0})
    msg = str(exc.value)
    assert msg.startswith("step 7: the training loss diverged: 25 at step 5, 30 at step 6, 95 at step 7")
    assert "band 19.8 = best 5 + 2 x |first 7.4|" in msg and "train.learning_rate" in msg
    assert exc.value.exit_code == 3 and exc.value.status == "diverged"


def test_one_spike_or_a_broken_streak_is_not_a_divergence():
    from tunelab.distributed.faults import DivergenceGuard

    guard = DivergenceGuard("stop", factor=1.0, patience=3)
    _feed(guard, [2.0, 1.0, 9.0, 9.0, 1.5, 9.0, 9.0, 2.0, float("nan"), 1.0])  # never 3 out of band in a row
    assert guard.events == [] and guard.best == 1.0


def test_a_loss_sinking_to_zero_keeps_a_band_the_size_of_its_start():
    """DPO on easy pairs: 0.693 -> 0.001, with wobbles up to 10x its best near 0: not a divergence (a band of
    k x best alone would trip on it); back above 0.693 + 2 x 0.693 three times would be."""
    from tunelab.distributed.faults import DivergenceGuard

    guard = DivergenceGuard("stop", factor=2.0, patience=3)
    _feed(guard, [0.693, 0.3, 0.05, 0.001, 0.01, 0.02, 0.01, 0.5, 0.9, 1.2])
    assert guard.events == []


# Quickstart PPO, measured. Healthy (CI, steps 1-21, the reward rising 0.06 -> 0.31): its logged loss (policy
# surrogate about 0, either sign, + a value loss growing with the reward's spread). Healthy (80 steps, held-out
# sampled reward 0.09 -> 0.34): the rollout's KL to the reference per completion token. Blown up (learning rate
# 0.99): loss, approx_kl and KL per token of steps 1-4.
PPO_LOSS = [0.0129, 0.0152, 0.0394, -0.0229, 0.0157, -0.0218, 0.0182, 0.0144, -0.0188, 0.0312, 0.0331, 0.0026,
            -0.0145, 0.0778, 0.0457, -0.0092, 0.0179, -0.0075, 0.0127, 0.0485, 0.0925]
PPO_KL_PER_TOKEN = [
    0.0, 0.002, 0.0179, 0.0173, 0.0295, 0.0552, 0.0072, 0.0729, 0.0206, -0.0054, 0.0112, 0.0007, 0.0322, 0.0423,
    0.0225, 0.0457, 0.0246, 0.025, 0.0014, 0.0006, 0.0212, 0.0389, 0.0238, 0.0543, 0.1058, 0.0602, 0.0703, 0.0322,
    0.0895, 0.0735, 0.0808, 0.028, 0.0357, 0.0736, 0.2464, -0.0277, 0.0862, 0.0604, 0.0634, 0.0652, 0.1048, 0.0671,
    0.034, 0.0563, 0.0615, 0.0891, 0.0373, 0.0673, 0.1227, 0.0893, 0.079, 0.036, 0.0625, 0.1075, 0.0691, 0.0637,
    0.125, 0.0632, 0.063, 0.108, 0.0822, 0.1456, 0.0776, 0.0578, 0.0593, 0.1077, 0.1425, 0.0335, 0.0845, 0.0521,
    0.1158, 0.1082, 0.1196, 0.1426, 0.1546, 0.0603, 0.1517, 0.1433, 0.1536, 0.142]
PPO_BLOWN = {"loss": [3635.9, 3709.6, 1411.0, 672.8], "approx_kl": [250.99, 164.69, 0.0, 0.0],
             "kl_per_token": [0.0, 7.172, 4.415, 4.294]}


def test_ppo_is_watched_by_its_kl_to_the_reference_with_a_floor_not_by_its_loss():
    """PPO's loss left the band of its tiny first value in a healthy run (a guard on it stopped a learning run at
    step 21), and neither its loss nor approx_kl leaves a band when the first update is the blow-up (both start
    huge). Its KL to the reference per token starts at 0: with the floor as the band's scale it stays in band
    through a healthy run and trips on the blow-up at step 4."""
    from tunelab.distributed.faults import DivergenceGuard
    from tunelab.errors import Diverged
    from tunelab.methods.ppo import PPO

    with pytest.raises(Diverged):
        _feed(DivergenceGuard("stop", factor=2.0, patience=3), PPO_LOSS)
    for key in ("loss", "approx_kl"):
        blind = DivergenceGuard("stop", 2.0, 3, metric=key)
        _feed(blind, PPO_BLOWN[key], key=key)
        assert blind.events == []

    assert (PPO.divergence_metric, PPO.divergence_floor) == ("kl_per_token", 0.5)
    healthy = DivergenceGuard("stop", 2.0, 3, metric=PPO.divergence_metric, floor=PPO.divergence_floor)
    for step, value in enumerate(PPO_KL_PER_TOKEN, 1):
        healthy.observe(step, {"kl_per_token": value, "loss": PPO_LOSS[step % len(PPO_LOSS)]})
    assert healthy.events == [] and healthy.band() == pytest.approx(-0.0277 + 2 * 0.5)

    blown = DivergenceGuard("stop", 2.0, 3, metric=PPO.divergence_metric, floor=PPO.divergence_floor)
    with pytest.raises(Diverged, match=r"^step 4: the training kl_per_token diverged: 7.172 at step 2, 4.415 at step "
                                       r"3, 4.294 at step 4, each above its band 1 = best 0 \+ 2 x its floor 0.5"):
        _feed(blown, PPO_BLOWN["kl_per_token"], key="kl_per_token")


def test_warn_records_and_goes_on_off_and_no_metric_never_look():
    from tunelab.distributed.faults import DivergenceGuard

    warn = DivergenceGuard("warn", factor=1.0, patience=2)
    _feed(warn, [1.0, 5.0, 6.0, 1.0, 7.0, 8.0])
    assert [e["step"] for e in warn.events] == [3, 6]
    assert warn.events[0]["values"] == [5.0, 6.0] and warn.events[0]["band"] == pytest.approx(2.0)
    for guard in (DivergenceGuard("off", 1.0, 1), DivergenceGuard("stop", 1.0, 1, metric=None)):
        _feed(guard, [1.0, 100.0, 1000.0])
        assert guard.events == [] and guard.first is None
    guard = DivergenceGuard("stop", 1.0, 1)
    guard.observe(1, {"reward": 5.0, "loss": True})  # no numeric loss in the row: nothing to hold
    assert guard.first is None


def test_nonfinite_loss_check_stops_or_skips_before_backward_and_grad_norm_after_an_engine_step():
    guard = NonFiniteGuard("skip")
    assert guard.check_loss(torch.tensor(1.5), step=3) is True
    assert guard.check_loss(torch.tensor(float("nan")), step=4) is False
    assert guard.check_loss(torch.tensor(float("inf")), step=4) is False  # a second minibatch of step 4
    assert guard.skipped == [4]
    with pytest.raises(NonFiniteError, match=r"^step 9: the loss is not finite"):
        NonFiniteGuard("stop").check_loss(torch.tensor(float("-inf")), step=9)
    NonFiniteGuard("stop").check_grad_norm(3.5, step=2)
    NonFiniteGuard("stop").check_grad_norm(None, step=2)  # the engine computed none (no clipping)
    with pytest.raises(NonFiniteError, match=r"^step 2: the gradient norm is nan"):
        NonFiniteGuard("stop").check_grad_norm(float("nan"), step=2)


def test_resume_position_counts_updates_as_transformers_does():
    """transformers: updates per epoch = ceil(micro-batches / grad_accum); skipped micro-batches = updates into the
    epoch x grad_accum (trainer._init_training_state)."""
    from tunelab.distributed.faults import resume_position

    line = resume_position(step=7, max_steps=20, epoch=1.4, batches_per_epoch=10, grad_accum=2)
    assert line.startswith("resumed at step 7 of 20 (epoch 1.400); data: epoch 2, continuing after micro-batch 4 of 10")
    assert "epoch 1, continuing after micro-batch 10 of 11" in resume_position(5, 9, None, 11, 2)  # ceil(11/2) = 6
