"""The faults of a long run, handled so that no work is lost: preemption, non-finite steps, a rank that hangs.

- **Preemption.** SIGTERM (what Slurm sends before a time limit or a preemption; ``tunelab launch --slurm``
  asks for it with ``--signal``) or SIGUSR1 sets a flag; at the end of the step in progress every rank
  agrees on it (one all_reduce of a flag), a complete checkpoint of that step is written, ``preempted.json``
  is left in the run directory and the process exits with ``REQUEUE_EXIT`` (75, EX_TEMPFAIL). The rendered
  sbatch script requeues the job when it finds ``preempted.json``; ``--resume auto`` continues from the step.
- **Non-finite steps.** Before every optimizer step the gradients are checked (one fused norm over them):
  a NaN/inf stops the run naming the step (``train.on_nonfinite: stop``, the default), or the update is
  skipped and counted (``skip``: the gradients are dropped, so AdamW leaves weights and moments alone).
  A stopped run keeps its last checkpoint and never writes ``final/``.
- **Divergence.** Every logged training loss is held against its running band (``train.divergence``, the
  rule in ``specs.DivergenceSpec``): ``patience`` values in a row above ``best + factor * |first|`` stop
  the run naming the step and the figures (``train.on_divergence: stop``, the default: exit 3, the last
  checkpoint kept, no ``final/``), or are reported and marked in ``summary.json`` (``warn``). Every rank sees
  the same logged loss (it is averaged over ranks), so every rank stops at the same log.
- **A rank that hangs** (alive, but never arriving at a collective): a watchdog thread on every rank
  publishes its collective sequence number to the group's store; when a rank's collectives stop moving for
  ``TUNELAB_HANG_DUMP_S`` (default: half the collective timeout), every rank writes its Python stack to
  ``RUN/stacks/rank-N.txt`` (faulthandler, all threads), and the rank(s) whose sequence number is behind the
  others' are named: they did not arrive. The line starts with ``hang:`` so that the launcher can repeat it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.distributed.process_group import COLLECTIVE_TIMEOUT_ENV
from tunelab.errors import Diverged, NonFinite, Preempted
from tunelab.log import say

REQUEUE_EXIT = Preempted.exit_code  # 75, EX_TEMPFAIL: stopped for now, run it again
PREEMPTED_FILE = "preempted.json"
HANG_DUMP_ENV = "TUNELAB_HANG_DUMP_S"


class NonFiniteError(NonFinite):
    """A loss or gradient became NaN/inf and ``train.on_nonfinite`` is ``stop``."""


def _world() -> tuple[Any, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist, dist.get_world_size()
    return None, 1


class PreemptionGuard:
    """A flag set by SIGTERM/SIGUSR1; ``requested()`` is the flag agreed by every rank (any rank's signal counts)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handler(self, signum: int, frame: Any) -> None:  # a second signal changes nothing: the checkpoint goes on
        if self.signal is None:
            self.signal = signum
            say(f"received {signal.Signals(signum).name}: writing a checkpoint at the end of this step, then "
                f"exiting with code {REQUEUE_EXIT} (resume with --resume auto)")

    def requested(self) -> bool:
        dist, world = _world()
        if dist is None:
            return self.signal is not None
        import torch

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def write_preempted(root: Path, step: int, checkpoint: Path | None, signum: int | None) -> Path:
    """``preempted.json``: the step and checkpoint a preempted run stopped at (the sbatch script requeues on it)."""
    path = root / PREEMPTED_FILE
    path.write_text(json.dumps({"step": step, "checkpoint": str(checkpoint) if checkpoint else None,
                                "signal": signal.Signals(signum).name if signum else None, "time": time.time()}))
    return path


def grads_finite(params: Any) -> bool:
    """Whether every gradient is finite: one fused norm per device, one sync."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms]).sum()).item())


class NonFiniteGuard:
    """What ``train.on_nonfinite`` does with a step whose gradients are NaN/inf: stop, or skip it (counted)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.skipped: list[int] = []

    def _stop(self, step: int, what: str) -> NonFiniteError:
        return NonFiniteError(
            f"step {step}: {what} is not finite (nan/inf); training stopped before the update, final/ was not written "
            "and the last checkpoint is as it was (lower train.learning_rate, check the data of this step, or set "
            "train.on_nonfinite: skip to drop such steps)")

    def check(self, params: list[Any], step: int) -> bool:
        """True when the optimizer may step; False when the update was dropped (skip); raises on stop."""
        if grads_finite(params):
            return True
        if self.mode == "stop":
            raise self._stop(step, "the loss or a gradient")
        for p in params:
            p.grad = None  # AdamW skips a parameter without a gradient: no update, no moment change
        self.skip(step)
        return False

    def check_loss(self, loss: Any, step: int) -> bool:
        """Before backward: True when the loss is finite; False to skip the step (skip); raises on stop.

        Where the gradients are not ours to look at before the update (DeepSpeed's engine steps inside
        backward), a non-finite loss is caught here, before any weight moves.
        """
        import torch

        if bool(torch.isfinite(loss.detach()).all()):
            return True
        if self.mode == "stop":
            raise self._stop(step, "the loss")
        self.skip(step)
        return False

    def check_grad_norm(self, norm: Any, step: int) -> None:
        """After an update whose gradients only the engine saw (DeepSpeed ZeRO): its global norm must be finite.

        The update has happened; stopping here still keeps the last checkpoint and writes no final/ (``skip``
        cannot undo it, which is why validate refuses ``on_nonfinite: skip`` under ZeRO).
        """
        if norm is not None and not math.isfinite(float(norm)):
            raise NonFiniteError(f"step {step}: the gradient norm is {float(norm)} (DeepSpeed's global norm, after its "
                                 "update): training stopped, final/ was not written and the last checkpoint is as it "
                                 "was (lower train.learning_rate or check the data of this step)")

    def skip(self, step: int) -> None:
        if self.skipped and self.skipped[-1] == step:
            return  # another minibatch of the same step (PPO)
        self.skipped.append(step)
        say(f"step {step}: non-finite gradient, update skipped ({len(self.skipped)} so far; train.on_nonfinite: skip)")


class DivergenceGuard:
    """``train.on_divergence``: the logged loss held against its running band (the rule: ``specs.DivergenceSpec``)."""

    def __init__(self, mode: str, factor: float, patience: int, metric: str | None = "loss",
                 floor: float = 0.0) -> None:
        self.mode, self.factor, self.patience, self.metric, self.floor = mode, factor, patience, metric, floor
        self.first: float | None = None
        self.best = math.inf
        self.out: list[tuple[int, float]] = []  # the logged values in a row above the band: (step, loss)
        self.events: list[dict[str, Any]] = []  # divergences seen under warn, for summary.json

    def band(self) -> float:
        """The highest value still in band: the best so far plus ``factor`` times the first logged value's size (at
        least ``floor``, for a watched value that can start near 0)."""
        assert self.first is not None
        return self.best + self.factor * max(abs(self.first), self.floor)

    def _scale(self) -> str:
        assert self.first is not None
        return f"|first {self.first:.4g}|" if abs(self.first) >= self.floor else f"its floor {self.floor:g}"

    def observe(self, step: int, logs: dict[str, Any]) -> None:
        """One logged row; raises ``Diverged`` (stop) or records the event (warn) once the loss left its band."""
        value = logs.get(self.metric) if self.metric else None
        if self.mode == "off" or isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        value = float(value)
        if not math.isfinite(value):
            return  # the non-finite guard's case
        if self.first is None:
            self.first = value
        if value <= self.band():
            self.out = []
        else:
            self.out.append((step, value))
        self.best = min(self.best, value)
        if len(self.out) < self.patience:
            return
        seen = ", ".join(f"{v:.4g} at step {s}" for s, v in self.out)
        what = (f"step {step}: the training {self.metric} diverged: {seen}, each above its band "
                f"{self.band():.4g} = best {self.best:.4g} + {self.factor:g} x {self._scale()}")
        self.events.append({"step": step, "values": [v for _, v in self.out], "band": self.band(), "best": self.best,
                            "first": self.first, "factor": self.factor, "patience": self.patience,
                            "metric": self.metric})
        self.out = []
        if self.mode == "stop":
            raise Diverged(f"{what}; training stopped: the last complete checkpoint is kept and final/ was not written "
                           "(lower train.learning_rate, add train.warmup_ratio or lower train.max_grad_norm; "
                           "train.on_divergence: warn trains on, train.divergence.factor/patience widen the band)")
        say(f"warning: {what} (train.on_divergence: warn: training goes on)")


@dataclass
class Guards:
    """The fault guards of one run, handed to whichever trainer the method builds (``methods.base``)."""

    preemption: PreemptionGuard
    nonfinite: NonFiniteGuard
    divergence: DivergenceGuard = field(default_factory=lambda: DivergenceGuard("off", 1.0, 1))

    def callbacks(self) -> list[Any]:
        """transformers TrainerCallbacks that run the guards inside transformers' (and TRL's) Trainer loop."""
        return fault_callbacks(self)


def fault_callbacks(guards: Guards) -> list[Any]:
    """TrainerCallbacks for transformers' Trainer: the preemption checkpoint, the non-finite and divergence checks,
    and the resume position said out loud."""
    from transformers import TrainerCallback

    class Faults(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None, **kw: Any) -> None:
            if state.global_step > 0:  # transformers has loaded a checkpoint's state: where the run goes on
                say(resume_position(state.global_step, state.max_steps, state.epoch,
                                    len(train_dataloader) if train_dataloader is not None else None,
                                    args.gradient_accumulation_steps))

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if model is not None:  # after clipping, before the update; DDP gradients are already averaged
                guards.nonfinite.check([p for p in model.parameters() if p.requires_grad], state.global_step + 1)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            guards.divergence.observe(state.global_step, logs or {})

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step < state.max_steps and guards.preemption.requested():
                guards.preemption.stopped_at = state.global_step
                control.should_save = True
                control.should_training_stop = True

    return [Faults()]


def resume_position(step: int, max_steps: int, epoch: float | None, batches_per_epoch: int | None,
                    grad_accum: int) -> str:
    """The line a resumed run says: the step it continues from and where in the data it picks up."""
    line = f"resumed at step {step} of {max_steps}"
    if epoch is not None:
        line += f" (epoch {epoch:.3f})"
    if batches_per_epoch:
        updates = max(-(-batches_per_epoch // grad_accum), 1)  # transformers' count: a last partial group is a step
        done, into = divmod(step, updates)
        line += (f"; data: epoch {done + 1}, continuing after micro-batch {into * grad_accum} of {batches_per_epoch} "
                 "(the earlier ones are skipped, in the uncut run's seeded order)")
    return line


# ---------------------------------------------------------------------------------------------- hangs


class HangWatchdog(threading.Thread):
    """Per rank: publish this rank's collective count; when it stops moving, dump every rank's stack, name laggards."""

    PREFIX = "tunelab/watch"

    def __init__(self, root: Path, stall_s: float, poll_s: float = 1.0) -> None:
        import faulthandler

        import torch.distributed as dist

        super().__init__(name="tunelab-hang-watchdog", daemon=True)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.store = dist.distributed_c10d._get_default_store()
        self.group = dist.distributed_c10d._get_default_group()
        self.stall_s, self.poll_s = stall_s, poll_s
        self.dir = root / "stacks"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = (self.dir / f"rank-{self.rank}.txt").open("w")
        self._stop = threading.Event()
        self.dumped = False
        if hasattr(signal, "SIGUSR2"):  # `kill -USR2 PID` writes a live rank's stack on demand too
            faulthandler.register(signal.SIGUSR2, file=self.file, all_threads=True)

    def seq(self) -> int:
        return int(self.group._get_sequence_number_for_group())  # type: ignore[attr-defined]

    def stop(self) -> None:
        self._stop.set()

    def dump(self, why: str) -> None:
        import faulthandler

        if self.dumped:
            return
        self.dumped = True
        self.file.write(f"# rank {self.rank} pid {os.getpid()}: {why}\n")
        self.file.flush()
        faulthandler.dump_traceback(file=self.file, all_threads=True)
        self.file.flush()

    def run(self) -> None:
        last, since = -1, time.monotonic()
        while not self._stop.wait(self.poll_s):
            try:
                seq = self.seq()
                self.store.set(f"{self.PREFIX}/{self.rank}", str(seq))
                if seq != last:
                    last, since = seq, time.monotonic()
                if not self.dumped and self.store.check([f"{self.PREFIX}/dump"]):
                    self.dump(f"asked by rank {self.store.get(f'{self.PREFIX}/dump').decode()}")
                if not self.dumped and time.monotonic() - since > self.stall_s:
                    self.store.set(f"{self.PREFIX}/dump", str(self.rank))
                    self.dump(f"no collective finished for {time.monotonic() - since:.0f} s")
                    self.report(seq)
            except Exception:  # noqa: BLE001 -- the store went away (the job is ending): nothing left to watch
                return

    def report(self, seq: int) -> None:
        """Name the ranks behind this one's collective count (they did not arrive), once the others have dumped."""
        time.sleep(2 * self.poll_s)  # the other ranks' watchdogs see the dump request and write their stacks
        counts = {}
        for r in range(self.world):
            key = f"{self.PREFIX}/{r}"
            counts[r] = int(self.store.get(key)) if self.store.check([key]) else -1
        top = max(counts.values())
        behind = sorted(r for r, c in counts.items() if c < top)
        if behind:
            what = (f"hang: rank(s) {', '.join(map(str, behind))} did not arrive at collective #{top} "
                    f"(at #{min(counts[r] for r in behind)}; ranks {', '.join(str(r) for r in counts if r not in behind)}"
                    f" wait in it)")
        else:
            what = f"hang: no collective finished on any of the {self.world} ranks for {self.stall_s:.0f} s"
        what += f"; Python stacks of every rank: {self.dir}"
        (self.dir / "hang.txt").write_text(what + "\n" + json.dumps({"sequence": counts}) + "\n")
        print(f"[tunelab rank {self.rank}] {what}", file=sys.stderr, flush=True)  # any rank; the launcher reads it


def start_watchdog(root: Path) -> HangWatchdog | None:
    """The hang watchdog of this rank, when there are several (None otherwise)."""
    dist, world = _world()
    if dist is None:
        return None
    timeout = float(os.environ.get(COLLECTIVE_TIMEOUT_ENV, "600"))
    stall = float(os.environ.get(HANG_DUMP_ENV, str(max(5.0, timeout / 2))))
    watchdog = HangWatchdog(root, stall)
    watchdog.start()
    return watchdog
