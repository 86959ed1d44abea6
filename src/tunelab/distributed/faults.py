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
- **A rank that hangs** (alive, but never arriving at a collective): a watchdog thread on every rank
  publishes its collective sequence number to the group's store; when a rank's collectives stop moving for
  ``TUNELAB_HANG_DUMP_S`` (default: half the collective timeout), every rank writes its Python stack to
  ``RUN/stacks/rank-N.txt`` (faulthandler, all threads), and the rank(s) whose sequence number is behind the
  others' are named: they did not arrive. The line starts with ``hang:`` so that the launcher can repeat it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tunelab.distributed.process_group import COLLECTIVE_TIMEOUT_ENV
from tunelab.errors import Preempted
from tunelab.log import say

REQUEUE_EXIT = Preempted.exit_code  # 75, EX_TEMPFAIL: stopped for now, run it again
PREEMPTED_FILE = "preempted.json"
HANG_DUMP_ENV = "TUNELAB_HANG_DUMP_S"


class NonFiniteError(RuntimeError):
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

    def check(self, params: list[Any], step: int) -> bool:
        """True when the optimizer may step; False when the update was dropped (skip); raises on stop."""
        if grads_finite(params):
            return True
        if self.mode == "stop":
            raise NonFiniteError(
                f"step {step}: the loss or a gradient is not finite (nan/inf); training stopped before the update, "
                "final/ was not written and the last checkpoint is as it was (lower train.learning_rate, check the "
                "data of this step, or set train.on_nonfinite: skip to drop such steps)")
        for p in params:
            p.grad = None  # AdamW skips a parameter without a gradient: no update, no moment change
        self.skipped.append(step)
        say(f"step {step}: non-finite gradient, update skipped ({len(self.skipped)} so far; train.on_nonfinite: skip)")
        return False


def fault_callbacks(preemption: PreemptionGuard, nonfinite: NonFiniteGuard) -> list[Any]:
    """TrainerCallbacks for transformers' Trainer: the preemption checkpoint and the non-finite check."""
    from transformers import TrainerCallback

    class Faults(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if model is not None:  # after clipping, before the update; DDP gradients are already averaged
                nonfinite.check([p for p in model.parameters() if p.requires_grad], state.global_step + 1)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step < state.max_steps and preemption.requested():
                preemption.stopped_at = state.global_step
                control.should_save = True
                control.should_training_stop = True

    return [Faults()]


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
