"""The rendered Slurm script (launch/slurm.py): its content, a run against stand-in Slurm commands, its errors."""

import os
import stat
import subprocess

import pytest

from tunelab.errors import UserError
from tunelab.launch.slurm import SlurmJob, render_sbatch


RECIPE = "recipes/quickstart/sft.yaml"


SETS = ["train.max_steps=3", "train.output_dir=runs/a b"]


def _after(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def _render(**kw) -> str:
    job = SlurmJob(nodes=3, gpus_per_node=4, cpus_per_task=32, time="12:00:00", partition="gpu", account="proj",
                   job_name="sft", hf_home="/shared/hf", env={"NCCL_SOCKET_IFNAME": "ib0", "NCCL_DEBUG": "INFO"},
                   **{"setup": ["source /shared/venv/bin/activate"], "output_dir": "runs/a b", **kw})
    return render_sbatch(job, RECIPE, SETS)


def test_slurm_script_content(tmp_path):
    script = _render()
    for line in ("#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=32", "#SBATCH --time=12:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --job-name=sft", "#SBATCH --output=logs/%x-%j.out",
                 "export HF_HOME=/shared/hf", "export NCCL_SOCKET_IFNAME=ib0", "export NCCL_DEBUG=INFO",
                 "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "export OMP_NUM_THREADS=8", "GPUS_PER_NODE=4",
                 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
                 "source /shared/venv/bin/activate"):
        assert line in script.splitlines(), line
    assert "export NCCL_DEBUG=WARN" not in script  # the user's value replaces the default
    assert '--nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE"' in script
    assert '--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"' in script
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task=32 " in script
    assert "--max-restarts 0" in script
    assert "#SBATCH --signal=TERM@120" in script.splitlines() and "#SBATCH --requeue" in script.splitlines()
    assert "--resume auto" in script  # a requeued job continues from its last complete checkpoint
    plain = _render(signal_lead_s=0, requeue=False)
    assert "--signal" not in plain and "requeue" not in plain and "--resume" not in plain
    assert "8" not in script.replace("OMP_NUM_THREADS=8", "")  # no hard-coded GPU count
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def test_slurm_script_runs_with_fake_slurm(tmp_path):
    """Run the script with stand-ins for scontrol and srun: torchrun gets Slurm's node count and master."""
    path = tmp_path / "job.sbatch"
    path.write_text(_render(master_port=29555))
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    fakes = {"scontrol": 'printf "gpu-node-07\\ngpu-node-08\\ngpu-node-09\\n"',
             "srun": f'printf "%s\\n" "$@" > {tmp_path}/srun.args; env > {tmp_path}/srun.env'}
    for name, body in fakes.items():
        (bin_ / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_ / name).chmod(stat.S_IRWXU)
    script = path.read_text().replace("/shared/venv/bin/activate", str(tmp_path / "activate"))
    (tmp_path / "activate").write_text("")
    path.write_text(script)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[07-09]",
           "SLURM_NNODES": "3", "SLURM_JOB_ID": "4242"}
    proc = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert (_after(args, "--nnodes"), _after(args, "--nproc-per-node"), _after(args, "--rdzv-endpoint"),
            _after(args, "--rdzv-id")) == ("3", "4", "gpu-node-07:29555", "4242")
    assert args[-8:] == ["train", RECIPE, "--set", SETS[0], "--set", SETS[1], "--resume", "auto"]
    assert "HF_HOME=/shared/hf" in (tmp_path / "srun.env").read_text().splitlines()
    (tmp_path / "srun.args").unlink()
    (bin_ / "scontrol").write_text("#!/bin/bash\nexit 1\n")  # no host to rendezvous on: a clear error, no srun
    proc = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "no MASTER_ADDR" in proc.stderr and not (tmp_path / "srun.args").exists()


def test_slurm_job_problems():
    with pytest.raises(UserError) as exc:
        render_sbatch(SlurmJob(nodes=0, gpus_per_node=0, time="soon", env={"1BAD": "x"}), RECIPE, [])
    assert {p.where for p in exc.value.problems} == {"--nnodes", "--gpus-per-node", "--time", "--env"}


def _fake_slurm(tmp_path, srun_body: str, **kw):
    """The script run with stand-ins: scontrol names the hosts and records a requeue; srun runs ``srun_body``."""
    path = tmp_path / "job.sbatch"
    path.write_text(_render(setup=[], **kw))
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    fakes = {"scontrol": f'if [ "$1" = requeue ]; then echo "$@" >> {tmp_path}/requeued; exit 0; fi\n'
                         'printf "gpu-node-07\\n"',
             "srun": srun_body}
    for name, body in fakes.items():
        (bin_ / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_ / name).chmod(stat.S_IRWXU)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-07",
           "SLURM_NNODES": "1", "SLURM_JOB_ID": "4242"}
    return subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, cwd=tmp_path)


@pytest.mark.parametrize("how", ["marker", "exit75", "failed", "ok"])
def test_slurm_script_requeues_a_preempted_run(tmp_path, how):
    """A run that stopped at a checkpoint (preempted.json in its output_dir, or exit 75) is requeued and the
    job ends 0; a run that failed is not requeued and the job keeps its exit code; a finished one ends 0."""
    body = {"marker": 'mkdir -p "runs/a b" && echo \'{"step": 7}\' > "runs/a b/preempted.json"; exit 1',
            "exit75": "exit 75", "failed": "exit 3", "ok": "exit 0"}[how]
    proc = _fake_slurm(tmp_path, body)
    requeued = tmp_path / "requeued"
    if how in ("marker", "exit75"):
        assert proc.returncode == 0, proc.stderr
        assert requeued.read_text().split() == ["requeue", "4242"]
        assert "requeueing job 4242" in proc.stdout
    else:
        assert proc.returncode == {"failed": 3, "ok": 0}[how] and not requeued.exists()


def test_slurm_script_requeue_without_output_dir(tmp_path):
    """Not validated (no output_dir known): only exit 75 says preempted."""
    assert _fake_slurm(tmp_path, "exit 75", output_dir=None).returncode == 0
    assert (tmp_path / "requeued").exists()
