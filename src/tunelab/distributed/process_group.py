"""The worker's process group: formed (gloo for DeepSpeed on a CPU), checked that every rank is there, never hung forever.

``connectivity_check`` runs right after the group forms (in ``tunelab train``): each rank signs in
to the group's key-value store with its host and pid, then all ranks run one all_reduce. A rank
that never arrives is named (``rank 3 (never arrived) ...``) instead of the others waiting for the
default 30 minutes; a wrong sum means the collective itself is broken (mismatched backends,
a firewall between nodes that lets the store through but not the data ports).

It also shortens the group's collective timeout (``TUNELAB_COLLECTIVE_TIMEOUT_S``, default 600 s)
so that a peer lost mid-run -- a node that vanished without closing its sockets -- ends in an
error after that long, not after the 30 minutes gloo and accelerate use by default. A peer that
dies outright closes its sockets and torchrun's monitor stops the job within a second or two.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

from tunelab import log

COLLECTIVE_TIMEOUT_ENV = "TUNELAB_COLLECTIVE_TIMEOUT_S"


def connectivity_check(timeout_s: float = 120.0, say=None) -> int:  # noqa: ANN001
    """Check that all ranks of the default process group are connected; returns the world size.

    Prints "N ranks connected (hosts ...)" on local rank 0 of every node. Raises RuntimeError naming the ranks that
    did not arrive within ``timeout_s``, or when the all_reduce gives a wrong sum. A no-op (returns 1)
    when no process group is initialised.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    rank, world = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()
    prefix = "tunelab/connectivity"
    store.set(f"{prefix}/{rank}", f"{socket.gethostname()} pid {os.getpid()}")
    keys = [f"{prefix}/{r}" for r in range(world)]
    started = time.monotonic()
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 -- a store timeout's type differs between torch versions
        missing = [r for r in range(world) if not store.check([f"{prefix}/{r}"])]
        raise RuntimeError(f"connectivity check: rank(s) {', '.join(map(str, missing))} of {world} did not "
                           f"reach the process group within {timeout_s:.0f} s (seen from rank {rank} on "
                           f"{socket.gethostname()}): a rank crashed or hangs before training ({exc})") from None
    hosts = {r: store.get(f"{prefix}/{r}").decode() for r in range(world)}
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([float(rank)], device=device)
    work = dist.all_reduce(value, async_op=True)
    if not work.wait(timedelta(seconds=timeout_s)):
        raise RuntimeError(f"connectivity check: the all_reduce did not finish within {timeout_s:.0f} s on rank "
                           f"{rank}")
    expected = world * (world - 1) / 2
    if value.item() != expected:
        raise RuntimeError(f"connectivity check: all_reduce of the ranks gave {value.item()}, expected {expected}")
    limit = float(os.environ.get(COLLECTIVE_TIMEOUT_ENV, "600"))
    if limit > 0:
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=limit))
    if rank == 0 or os.environ.get("LOCAL_RANK") == "0":  # one line per node: each node's log shows it
        by_host: dict[str, list[int]] = {}
        for r, text in hosts.items():
            by_host.setdefault(text.split(" pid ")[0], []).append(r)
        where = ", ".join(f"{h}: {len(rs)}" for h, rs in by_host.items())
        msg = f"{world} ranks connected in {time.monotonic() - started:.1f} s ({where})"
        (say or log.say)(msg)
    return world


def close_process_group() -> None:
    """Leave the process group together at the end of a run (a no-op without one).

    Every rank waits at a barrier, then tears its group down before the interpreter exits. Left to
    interpreter exit, gloo's teardown could race a peer that had already gone and abort a rank whose
    work was done (seen once in ~25 CPU runs: SIGABRT after final/ was written, failing the job).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cuda_available() -> bool:
    """Whether this process sees a CUDA device (imports torch)."""
    import torch

    return torch.cuda.is_available()


def deepspeed_needs_gloo() -> bool:
    """DeepSpeed under a launcher (or train.py's one-process group) on a machine without CUDA (tests, CI)."""
    return int(os.environ.get("LOCAL_RANK", "-1")) != -1 and not cuda_available()


def deepspeed_process_group() -> None:
    """Form the DeepSpeed process group over gloo before the Trainer does (CPU only; see distributed_arguments).

    transformers' TrainingArguments, given a DeepSpeed config, asks accelerate for a process group
    without naming a backend, and accelerate finds none without CUDA: every rank would train alone.
    """
    if not deepspeed_needs_gloo():
        return
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    AcceleratorState._reset_state(reset_partial_state=True)  # validate() built TrainingArguments: a state without a group
    PartialState(backend="gloo")
