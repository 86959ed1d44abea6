"""The worker command of every launch mode: ``torchrun <rendezvous> -m tunelab train RECIPE --set ...``.

torchrun always runs with ``--max-restarts 0``: a rank that dies makes torchrun stop the others at
once (it polls its workers every 0.1 s) instead of restarting the group.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from tunelab.errors import Problem

DEFAULT_PORT = 29500
@dataclass
class Rendezvous:
    """How the torchrun agents of all nodes find each other (static master, or a c10d endpoint)."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str = "tunelab"
    rdzv_timeout_s: int = 300

    @property
    def mode(self) -> str:
        """standalone (one node, free port) | static (master addr/port) | c10d (rendezvous endpoint)."""
        if self.rdzv_endpoint:
            return "c10d"
        if self.nnodes == 1 and self.master_addr is None and self.master_port is None:
            return "standalone"
        return "static"

    def problems(self) -> list[Problem]:
        """Everything wrong with the flags, all at once."""
        out: list[Problem] = []
        if self.nproc_per_node < 1:
            out.append(Problem("--nproc-per-node", f"must be at least 1, got {self.nproc_per_node}"))
        if self.nnodes < 1:
            out.append(Problem("--nnodes", f"must be at least 1, got {self.nnodes}"))
        if self.rdzv_timeout_s < 1:
            out.append(Problem("--rdzv-timeout", f"must be at least 1 second, got {self.rdzv_timeout_s}"))
        if self.rdzv_endpoint:
            if self.master_addr or self.master_port:
                out.append(Problem("--rdzv-endpoint", "given together with --master-addr/--master-port",
                                   "use one: a c10d endpoint HOST:PORT, or a static master"))
            if self.node_rank is not None:
                out.append(Problem("--node-rank", "the c10d rendezvous assigns node ranks itself",
                                   "drop --node-rank, or use --master-addr/--master-port instead of --rdzv-endpoint"))
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                out.append(Problem("--rdzv-endpoint", f"{self.rdzv_endpoint!r} is not HOST:PORT"))
            return out
        if self.master_port is not None and not 0 < self.master_port < 65536:
            out.append(Problem("--master-port", f"{self.master_port} is not a TCP port (1..65535)"))
        if self.nnodes > 1:
            if self.node_rank is None:
                out.append(Problem("--node-rank", f"needed with --nnodes {self.nnodes}",
                                   f"0 on the master node, 1..{self.nnodes - 1} on the others"))
            if not self.master_addr:
                out.append(Problem("--master-addr", f"needed with --nnodes {self.nnodes}",
                                   "the address of node 0 that every node can reach, or use --rdzv-endpoint"))
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            out.append(Problem("--node-rank", f"{self.node_rank} is not in 0..{self.nnodes - 1}"))
        return out

    def torchrun_args(self) -> list[str]:
        """The rendezvous part of a torchrun command line."""
        args = ["--nproc-per-node", str(self.nproc_per_node)]
        if self.mode == "standalone":  # c10d on localhost with a free port: two launches never collide
            return ["--standalone", *args]
        if self.mode == "c10d":
            return ["--nnodes", str(self.nnodes), *args, "--rdzv-backend", "c10d", "--rdzv-endpoint",
                    self.rdzv_endpoint or "", "--rdzv-id", self.rdzv_id, "--rdzv-conf",
                    f"join_timeout={self.rdzv_timeout_s}"]
        return ["--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank or 0), *args, "--master-addr",
                self.master_addr or "127.0.0.1", "--master-port", str(self.master_port or DEFAULT_PORT),
                "--rdzv-conf", f"timeout={self.rdzv_timeout_s}"]


def train_args(recipe: str, overrides: list[str], resume: str | None = None) -> list[str]:
    """``-m tunelab train RECIPE --set ...``: what every worker runs."""
    args = ["-m", "tunelab", "train", recipe]
    for item in overrides:
        args += ["--set", item]
    if resume:
        args += ["--resume", resume]
    return args


def torchrun_command(rdzv: Rendezvous, recipe: str, overrides: list[str], resume: str | None = None,
                     python: str | None = None) -> list[str]:
    """The full torchrun command for one node."""
    return [python or sys.executable, "-m", "torch.distributed.run", *rdzv.torchrun_args(), "--max-restarts", "0",
            *train_args(recipe, overrides, resume)]


# ---------------------------------------------------------------------------------------------- hostfile
