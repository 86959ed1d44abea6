"""``tunelab launch``: one node, several nodes, a hostfile or a Slurm script; the four jobs live beside it.

``torchrun`` (the worker command line), ``hostfile`` (one agent per host, over ssh), ``monitor`` (run the
agents and name the rank that failed), ``slurm`` (the sbatch script). This module picks the mode.

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

import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import Problem, UserError
from tunelab.launch.hostfile import hostfile_commands, parse_hostfile
from tunelab.launch.monitor import monitor
from tunelab.launch.slurm import SlurmJob, render_sbatch
from tunelab.launch.torchrun import DEFAULT_PORT, Rendezvous, torchrun_command
from tunelab.recipe.validate import validate


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
    signal_lead_s: int = 120
    requeue: bool = True


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

    output_dir = None
    if opts.validate:  # every recipe error before a node starts (or a job is queued)
        output_dir = validate(recipe, overrides).recipe.train.output_dir

    if opts.slurm:
        gpus = opts.gpus_per_node or (rdzv.nproc_per_node if opts.nproc_given else None) or local_gpu_count()
        if not gpus:
            raise UserError(Problem("--gpus-per-node", "no GPU on this machine to count",
                                    "pass --gpus-per-node N (the GPUs of one compute node)"))
        job = SlurmJob(nodes=rdzv.nnodes, gpus_per_node=gpus, cpus_per_task=opts.cpus_per_task, time=opts.time,
                       partition=opts.partition, account=opts.account, job_name=opts.job_name, output=opts.log,
                       hf_home=opts.hf_home, master_port=rdzv.master_port or DEFAULT_PORT,
                       rdzv_timeout_s=rdzv.rdzv_timeout_s, env=env, setup=opts.setup,
                       signal_lead_s=opts.signal_lead_s, requeue=opts.requeue, output_dir=output_dir)
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
