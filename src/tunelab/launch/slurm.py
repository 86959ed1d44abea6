"""``tunelab launch --slurm``: an sbatch script that runs one torchrun per node with Slurm's variables.

One Slurm task per node (``--ntasks-per-node=1``); each task is a torchrun agent that starts
``--gpus-per-node`` workers. The agents meet at a c10d rendezvous on the first node of the
allocation (``scontrol show hostnames $SLURM_JOB_NODELIST | head -n1``), so no node rank is
computed by hand and the same line runs on every node. ``srun --kill-on-bad-exit=1`` ends the
whole job when one node's torchrun fails.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import Problem, UserError
from tunelab.launch.torchrun import DEFAULT_PORT, train_args

# defaults exported before training; a user --env of the same name wins
DEFAULT_ENV = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a failed/timed-out NCCL collective aborts, not hangs
    "NCCL_DEBUG": "WARN",
    "TUNELAB_COLLECTIVE_TIMEOUT_S": "600",  # read by the connectivity check: collective timeout mid-run
}


@dataclass
class SlurmJob:
    """The sbatch options and environment of a rendered job."""

    nodes: int
    gpus_per_node: int
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    job_name: str = "tunelab"
    output: str = "logs/%x-%j.out"
    hf_home: str | None = None
    master_port: int = DEFAULT_PORT
    rdzv_timeout_s: int = 300
    env: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, source venv)
    signal_lead_s: int = 120  # SIGTERM this long before the time limit: the ranks checkpoint and stop (0: none)
    requeue: bool = True  # requeue the job when it stopped at a checkpoint (RUN/preempted.json)
    output_dir: str | None = None  # the recipe's train.output_dir, where preempted.json appears

    def problems(self) -> list[Problem]:
        out = []
        if self.nodes < 1:
            out.append(Problem("--nnodes", f"must be at least 1, got {self.nodes}"))
        if self.gpus_per_node < 1:
            out.append(Problem("--gpus-per-node", f"must be at least 1, got {self.gpus_per_node}"))
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            out.append(Problem("--cpus-per-task", f"must be at least 1, got {self.cpus_per_task}"))
        if self.time is not None and not all(part.isdigit() for part in self.time.replace("-", ":").split(":")):
            out.append(Problem("--time", f"{self.time!r} is not a Slurm time", "e.g. 4:00:00 or 1-12:00:00"))
        if self.signal_lead_s < 0:
            out.append(Problem("--signal-lead", f"must be 0 or more seconds, got {self.signal_lead_s}"))
        for key in self.env:
            if not key.isidentifier():
                out.append(Problem("--env", f"{key!r} is not a variable name"))
        return out


def render_sbatch(job: SlurmJob, recipe: str, overrides: list[str], resume: str | None = None) -> str:
    """The sbatch script as text (it passes ``bash -n``)."""
    problems = job.problems()
    if problems:
        raise UserError(problems)
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={job.job_name}",
             f"#SBATCH --nodes={job.nodes}",
             "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --gpus-per-node={job.gpus_per_node}"]
    if job.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={job.cpus_per_task}")
    if job.time:
        lines.append(f"#SBATCH --time={job.time}")
    if job.partition:
        lines.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        lines.append(f"#SBATCH --account={job.account}")
    if job.signal_lead_s:  # every process of the step: the ranks write a checkpoint and exit 75
        lines.append(f"#SBATCH --signal=TERM@{job.signal_lead_s}")
    if job.requeue:
        lines.append("#SBATCH --requeue")
        resume = resume or "auto"  # a requeued job continues from its last complete checkpoint
    lines += [f"#SBATCH --output={job.output}",
              "",
              "# rendered by `tunelab launch --slurm`; submit with: sbatch THIS_FILE",
              "set -eu  # no pipefail: scontrol ... | head -n1 ends scontrol with SIGPIPE on large jobs",
              ""]
    lines += job.setup
    env = dict(DEFAULT_ENV)
    if job.hf_home:
        env["HF_HOME"] = job.hf_home
    if job.cpus_per_task:
        env["OMP_NUM_THREADS"] = str(max(1, job.cpus_per_task // job.gpus_per_node))
    env.update(job.env)
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    worker = shlex.join(["python", "-m", "torch.distributed.run"])
    train = shlex.join(train_args(recipe, overrides, resume))
    lines += ["",
              f"GPUS_PER_NODE={job.gpus_per_node}",
              'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
              'if [ -z "$MASTER_ADDR" ]; then echo "no MASTER_ADDR: is this running under sbatch?" >&2; exit 1; fi',
              f"MASTER_PORT={job.master_port}",
              "export MASTER_ADDR MASTER_PORT",
              'echo "job $SLURM_JOB_ID: $SLURM_NNODES node(s) x $GPUS_PER_NODE GPU(s), rendezvous '
              '$MASTER_ADDR:$MASTER_PORT"',
              "",
              "# one torchrun agent per node; they meet at the c10d rendezvous on the first node",
              "srun --kill-on-bad-exit=1 --ntasks-per-node=1"
              # srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05)
              + (f" --cpus-per-task={job.cpus_per_task}" if job.cpus_per_task else "") + " \\",
              f"  {worker} \\",
              '  --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE" \\',
              '  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID" \\',
              f"  --rdzv-conf join_timeout={job.rdzv_timeout_s} --max-restarts 0 \\",
              f"  {train}" + (" && rc=0 || rc=$?" if job.requeue else ""),
              ""]
    if job.requeue:
        # torchrun reports a rank's exit 75 as its own failure (1): the marker the ranks write says "preempted"
        if job.output_dir:
            marker = shlex.quote(str(Path(job.output_dir) / "preempted.json"))
            stopped, said = f'[ "$rc" -eq 75 ] || [ -f {marker} ]', f"$(cat {marker} 2>/dev/null)"
        else:  # not validated (--no-validate): the run directory is unknown here, only the exit code tells
            stopped, said = '[ "$rc" -eq 75 ]', "exit 75"
        lines += ["# SIGTERM (--signal, or a preemption): the ranks wrote a checkpoint and preempted.json; go again",
                  f'if [ "$rc" -ne 0 ] && {{ {stopped}; }}; then',
                  f'  echo "stopped at a checkpoint ({said}): requeueing job $SLURM_JOB_ID"',
                  '  scontrol requeue "$SLURM_JOB_ID"',
                  "  exit 0",
                  "fi",
                  'exit "$rc"',
                  ""]
    return "\n".join(lines)
