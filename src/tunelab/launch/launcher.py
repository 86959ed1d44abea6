"""``tunelab launch``: torchrun command lines for one node, several nodes or a hostfile, and a monitor.

Every mode ends in the same worker command, ``python -m torch.distributed.run <rendezvous>
-m tunelab train RECIPE --set ...``: the DeepSpeed/FSDP strategy comes from the recipe's
``distributed:`` block inside ``tunelab train``, so nothing here passes accelerate flags.

torchrun always runs with ``--max-restarts 0``: a rank that dies makes torchrun stop the others
at once (it polls its workers every 0.1 s) instead of restarting the group. The monitor here reads
torchrun's failure report as it streams past and finishes with one line that names the rank,
its host, its pid and how it died; when no worker ever started, it says that the rendezvous
(the master, or the other nodes) was not reached within ``--rdzv-timeout``.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import Problem, UserError

DEFAULT_PORT = 29500
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
# variables forwarded to remote hosts over ssh (as deepspeed's runner does), by prefix
FORWARD_ENV_PREFIXES = ("NCCL_", "TORCH_", "HF_", "TUNELAB_", "PYTHONPATH", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")


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


@dataclass
class Failure:
    """The first rank that failed, as torchrun reported it (or as the monitor saw it vanish)."""

    rank: int
    local_rank: int | None = None
    host: str | None = None
    pid: int | None = None
    exitcode: int | None = None

    def describe(self) -> str:
        where = ", ".join(x for x in (f"local rank {self.local_rank}" if self.local_rank is not None else "",
                                      f"host {self.host}" if self.host else "",
                                      f"pid {self.pid}" if self.pid else "") if x)
        how = "exited"
        if self.exitcode is not None and self.exitcode < 0:
            try:
                how = f"was killed by {signal.Signals(-self.exitcode).name}"
            except ValueError:
                how = f"was killed by signal {-self.exitcode}"
        elif self.exitcode is not None:
            how = f"exited with code {self.exitcode}"
        return f"rank {self.rank}" + (f" ({where})" if where else "") + f" {how}"


_ROOT = re.compile(r"Root Cause \(first observed failure\):(?P<body>.*)", re.S)
_RANK = re.compile(r"rank\s*:\s*(-?\d+)\s*\(local_rank:\s*(-?\d+)\)")
_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)")
_HOST = re.compile(r"host\s*:\s*(\S+)")


def parse_torchrun_failure(text: str) -> Failure | None:
    """The root-cause rank from torchrun's ``ChildFailedError`` report, if the text holds one."""
    m = _ROOT.search(text)
    if not m:
        return None
    body = m["body"]
    rank = _RANK.search(body)
    if not rank:
        return None
    exit_ = _EXIT.search(body)
    host = _HOST.search(body)
    return Failure(rank=int(rank[1]), local_rank=int(rank[2]), host=host[1] if host else None,
                   pid=int(exit_[2]) if exit_ else None, exitcode=int(exit_[1]) if exit_ else None)


@dataclass
class _Watch:
    """What the monitor learns about one torchrun process while it runs."""

    tail: bytearray = field(default_factory=bytearray)
    ranks: dict[int, int] = field(default_factory=dict)  # pid -> global rank, of workers seen alive
    world_size: int | None = None
    first_gone: Failure | None = None


def _pump(stream, sink, watch: _Watch) -> None:  # noqa: ANN001
    """Copy torchrun's stderr through unchanged (progress bars too) and keep the last 64 KiB to parse."""
    fd = stream.fileno()
    while chunk := os.read(fd, 65536):
        sink.write(chunk)
        sink.flush()
        watch.tail += chunk
        del watch.tail[:-65536]


def _poll_workers(proc: subprocess.Popen, watch: _Watch, stop: threading.Event) -> None:
    """Map worker pids to ranks (from their RANK env) and note the first one that disappears."""
    try:
        import psutil
    except ImportError:  # psutil comes with accelerate; without it only torchrun's report is used
        return
    try:
        agent = psutil.Process(proc.pid)
    except psutil.Error:
        return
    while not stop.wait(0.5):
        try:
            children = agent.children()
        except psutil.Error:
            return
        alive = set()
        for child in children:
            alive.add(child.pid)
            if child.pid not in watch.ranks:
                try:
                    env = child.environ()
                except psutil.Error:
                    continue
                if "RANK" in env:
                    watch.ranks[child.pid] = int(env["RANK"])
                    watch.world_size = int(env.get("WORLD_SIZE", "0")) or None
        if watch.first_gone is None:
            for pid, rank in watch.ranks.items():
                if pid not in alive:
                    watch.first_gone = Failure(rank=rank, host=socket.gethostname(), pid=pid)
                    break


def monitor(commands: list[tuple[str, list[str]]], env: dict[str, str] | None = None, rendezvous: str = "",
            say=print) -> int:  # noqa: ANN001
    """Run one torchrun (or ssh) command per host; when one fails, stop the rest and name the failed rank.

    Returns the exit code to leave with: 0, or the first failure's (never 0 after a failure).
    """
    full_env = {**os.environ, **(env or {})}
    procs: list[tuple[str, subprocess.Popen, _Watch, threading.Event]] = []
    threads = []
    for host, cmd in commands:
        proc = subprocess.Popen(cmd, env=full_env, stderr=subprocess.PIPE)
        watch, stop = _Watch(), threading.Event()
        threads.append(threading.Thread(target=_pump, args=(proc.stderr, sys.stderr.buffer, watch), daemon=True))
        threads.append(threading.Thread(target=_poll_workers, args=(proc, watch, stop), daemon=True))
        procs.append((host, proc, watch, stop))
    for t in threads:
        t.start()
    start = time.monotonic()
    failed: tuple[str, subprocess.Popen, _Watch] | None = None
    try:
        while True:
            running = [p for _, p, _, _ in procs if p.poll() is None]
            bad = [(h, p, w) for h, p, w, _ in procs if p.returncode not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if not running:
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        for _, p, _, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for _, p, _, _ in procs:
            p.wait()
        raise
    finally:
        if failed is not None:  # the other hosts' agents would wait for their peers until a timeout
            for _, p, _, _ in procs:
                if p.poll() is None:
                    p.terminate()
            deadline = time.monotonic() + 30
            for _, p, _, _ in procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
        for _, p, _, stop in procs:
            p.wait()
            stop.set()
        for t in threads:
            t.join(timeout=5)
    if failed is None:
        for host, _, watch, _ in procs:
            ranks = ", ".join(map(str, sorted(watch.ranks.values())))
            if ranks:
                say(f"launch: {host}: rank(s) {ranks} of a {watch.world_size}-process job finished "
                    f"in {time.monotonic() - start:.0f} s")
        return 0
    host, proc, watch = failed
    elapsed = time.monotonic() - start
    text = watch.tail.decode("utf-8", "replace")
    failure = parse_torchrun_failure(text) or watch.first_gone
    if failure is not None:
        if failure.host is None and host and not is_local(host):
            failure.host = host
        say(f"error: {failure.describe()}; torchrun stopped the other ranks (exit code {proc.returncode} "
            f"after {elapsed:.0f} s)")
    elif not watch.ranks and "trying to connect to" in text:
        say(f"error: node {host}: could not reach the master {rendezvous or ''} (nothing listens there, or a "
            f"firewall is in the way; exit code {proc.returncode} after {elapsed:.0f} s)")
    elif not watch.ranks and any(s in text for s in ("Rendezvous", "DistNetworkError", "TimeoutError")):
        say(f"error: node {host}: the rendezvous{' at ' + rendezvous if rendezvous else ''} did not complete: the "
            f"master was not reachable, or not every node joined in time (exit code {proc.returncode} after "
            f"{elapsed:.0f} s)")
    else:
        say(f"error: node {host}: torchrun exited with code {proc.returncode} after {elapsed:.0f} s")
    return proc.returncode or 1


# ---------------------------------------------------------------------------------------------- entry


def parse_env(items: list[str]) -> dict[str, str]:
    """``--env K=V`` items as a dict; a malformed one is a UserError."""
    out, problems = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            problems.append(Problem("--env", f"{item!r} is not KEY=VALUE"))
        else:
            out[key] = value
    if problems:
        raise UserError(problems)
    return out


def local_gpu_count() -> int:
    """CUDA devices torch sees here (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass
class LaunchOptions:
    """Everything ``tunelab launch`` takes besides the recipe and its overrides."""

    rdzv: Rendezvous = field(default_factory=Rendezvous)
    nproc_given: bool = False
    hostfile: str | None = None
    slurm: bool = False
    output: str | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    job_name: str = "tunelab"
    log: str = "logs/%x-%j.out"
    hf_home: str | None = None
    env: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    dry_run: bool = False
    validate: bool = True


def run_launch(recipe: str, overrides: list[str], resume: str | None, opts: LaunchOptions,
               say=print) -> int:  # noqa: ANN001
    """Validate the recipe, then render (--slurm, --dry-run) or run torchrun; returns the exit code."""
    env = parse_env(opts.env)
    rdzv = opts.rdzv
    problems: list[Problem] = []
    if opts.slurm and opts.hostfile:
        problems.append(Problem("--slurm", "given together with --hostfile", "Slurm picks the hosts: use one"))
    if opts.slurm and (rdzv.rdzv_endpoint or rdzv.master_addr or rdzv.node_rank is not None):
        problems.append(Problem("--slurm", "the script finds its master and node ranks from Slurm's variables",
                                "drop --master-addr/--node-rank/--rdzv-endpoint"))
    if opts.hostfile and (rdzv.nnodes > 1 or rdzv.node_rank is not None or rdzv.rdzv_endpoint):
        problems.append(Problem("--hostfile", "the hostfile gives the nodes and their ranks",
                                "drop --nnodes/--node-rank/--rdzv-endpoint (--master-addr/--master-port may stay)"))
    if opts.output and not opts.slurm:
        problems.append(Problem("--output", "only --slurm writes a file", "add --slurm, or drop -o"))
    if not opts.slurm:
        problems += rdzv.problems()
    if problems:
        raise UserError(problems)

    if opts.validate:
        from tunelab.recipe.validate import validate

        validate(recipe, overrides)  # every recipe error before a node starts (or a job is queued)

    if opts.slurm:
        from tunelab.launch.slurm import SlurmJob, render_sbatch

        gpus = opts.gpus_per_node or (rdzv.nproc_per_node if opts.nproc_given else None) or local_gpu_count()
        if not gpus:
            raise UserError(Problem("--gpus-per-node", "no GPU on this machine to count",
                                    "pass --gpus-per-node N (the GPUs of one compute node)"))
        job = SlurmJob(nodes=rdzv.nnodes, gpus_per_node=gpus, cpus_per_task=opts.cpus_per_task, time=opts.time,
                       partition=opts.partition, account=opts.account, job_name=opts.job_name, output=opts.log,
                       hf_home=opts.hf_home, master_port=rdzv.master_port or DEFAULT_PORT,
                       rdzv_timeout_s=rdzv.rdzv_timeout_s, env=env, setup=opts.setup)
        script = render_sbatch(job, recipe, overrides, resume)
        if opts.output:
            Path(opts.output).parent.mkdir(parents=True, exist_ok=True)
            Path(opts.output).write_text(script, encoding="utf-8")
            say(f"wrote {opts.output}: {job.nodes} node(s) x {gpus} GPU(s); submit with: sbatch {opts.output}")
        else:
            say(script.rstrip("\n"))
        return 0

    if opts.hostfile:
        hosts = parse_hostfile(opts.hostfile)
        commands = [(h.name, cmd) for h, cmd in hostfile_commands(
            hosts, recipe, overrides, master_addr=rdzv.master_addr, master_port=rdzv.master_port,
            rdzv_timeout_s=rdzv.rdzv_timeout_s, resume=resume, env=env)]
        where = f"{rdzv.master_addr or hosts[0].name}:{rdzv.master_port or DEFAULT_PORT}"
    else:
        if not opts.nproc_given:
            rdzv.nproc_per_node = local_gpu_count() or 1
        commands = [(socket.gethostname(), torchrun_command(rdzv, recipe, overrides, resume))]
        where = rdzv.rdzv_endpoint or (f"{rdzv.master_addr}:{rdzv.master_port or DEFAULT_PORT}"
                                       if rdzv.mode == "static" else "")
    if opts.dry_run:
        for host, cmd in commands:
            exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
            say(f"# {host}\n{exports + ' ' if exports and cmd[0] != 'ssh' else ''}{shlex.join(cmd)}")
        return 0
    return monitor(commands, env=env, rendezvous=where, say=say)
