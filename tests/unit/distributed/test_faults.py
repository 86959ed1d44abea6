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
