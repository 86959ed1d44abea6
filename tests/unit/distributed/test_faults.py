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


def _feed(guard, losses, start=1):
    for i, loss in enumerate(losses, start):
        guard.observe(i, {"loss": loss})


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
