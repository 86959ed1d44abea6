"""Several nodes from a hostfile (``host slots=N`` lines): one torchrun per host, over ssh for the remote ones."""

from __future__ import annotations

import os
import re
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import Problem, UserError
from tunelab.launch.torchrun import DEFAULT_PORT, Rendezvous, torchrun_command

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
# variables forwarded to remote hosts over ssh (as deepspeed's runner does), by prefix
FORWARD_ENV_PREFIXES = ("NCCL_", "TORCH_", "HF_", "TUNELAB_", "PYTHONPATH", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")


@dataclass
class Host:
    """One line of a DeepSpeed-style hostfile: ``worker-1 slots=8``."""

    name: str
    slots: int
    line: int


_HOST_LINE = re.compile(r"^(?P<name>\S+)\s+slots\s*=\s*(?P<slots>\S+)$")


def parse_hostfile(path: str | Path) -> list[Host]:
    """Read ``HOST slots=N`` lines (``#`` comments, blank lines skipped); errors name FILE:LINE."""
    path = Path(path)
    if not path.is_file():
        raise UserError(Problem("--hostfile", f"{path} does not exist"))
    hosts: list[Host] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        where = f"{path}:{number}"
        m = _HOST_LINE.match(text)
        if not m:
            problems.append(Problem(where, f"expected 'HOST slots=N', got {text!r}"))
            continue
        name, slots = m["name"], m["slots"]
        if not slots.isdigit() or int(slots) < 1:
            problems.append(Problem(where, f"slots must be a positive integer, got {slots!r}"))
            continue
        if name in seen:
            problems.append(Problem(where, f"host {name} is listed again (first on line {seen[name]})"))
            continue
        seen[name] = number
        hosts.append(Host(name, int(slots), number))
    if not hosts and not problems:
        problems.append(Problem(str(path), "lists no hosts", "one 'HOST slots=N' line per node"))
    if problems:
        raise UserError(problems, title=f"hostfile {path}: {len(problems)} error(s)")
    return hosts


def is_local(host: str) -> bool:
    """True for this machine's own names (the launch then runs here, without ssh)."""
    return host in LOCAL_HOSTS or host in {socket.gethostname(), socket.getfqdn()}


def hostfile_commands(hosts: list[Host], recipe: str, overrides: list[str], *, master_addr: str | None = None,
                      master_port: int | None = None, rdzv_timeout_s: int = 300, resume: str | None = None,
                      env: dict[str, str] | None = None, cwd: str | None = None,
                      python: str | None = None) -> list[tuple[Host, list[str]]]:
    """One command per host: torchrun as node i of len(hosts), run over ssh unless the host is this machine.

    The master is the first host (or ``master_addr``); each host starts ``slots`` processes.
    """
    master = master_addr or hosts[0].name
    remote = [h for h in hosts if not is_local(h.name)]
    if remote and is_local(master):
        raise UserError(Problem(f"hostfile line {hosts[0].line}", f"the master is {master}, which the remote "
                                f"hosts ({remote[0].name}, ...) cannot reach", "list a routable name first, "
                                "or pass --master-addr"))
    cwd = cwd or os.getcwd()
    python = python or sys.executable
    out = []
    for rank, host in enumerate(hosts):
        rdzv = Rendezvous(nproc_per_node=host.slots, nnodes=len(hosts), node_rank=rank,
                          master_addr=master, master_port=master_port or DEFAULT_PORT, rdzv_timeout_s=rdzv_timeout_s)
        cmd = torchrun_command(rdzv, recipe, overrides, resume, python)
        if is_local(host.name) and not remote:
            out.append((host, cmd))
            continue
        forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES)}
        forwarded.update(env or {})
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(forwarded.items()))
        remote_cmd = f"cd {shlex.quote(cwd)} && exec {'env ' + exports + ' ' if exports else ''}{shlex.join(cmd)}"
        out.append((host, ["ssh", "-o", "BatchMode=yes", host.name, remote_cmd]))
    return out


# ---------------------------------------------------------------------------------------------- monitor
