"""`tunelab launch`: torchrun command lines per mode, hostfile errors, the rendered Slurm script."""

import os
import shlex
import stat
import subprocess

import pytest

from tunelab.errors import UserError
from tunelab.launch.hostfile import Host, hostfile_commands, parse_hostfile
from tunelab.launch.monitor import Failure, parse_torchrun_failure
from tunelab.launch.slurm import SlurmJob, render_sbatch
from tunelab.launch.torchrun import Rendezvous, torchrun_command

RECIPE = "recipes/quickstart/sft.yaml"
SETS = ["train.max_steps=3", "train.output_dir=runs/a b"]


def _after(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_single_node_is_standalone_torchrun_with_the_train_command():
    cmd = torchrun_command(Rendezvous(nproc_per_node=2), RECIPE, SETS, python="py")
    assert cmd[:4] == ["py", "-m", "torch.distributed.run", "--standalone"]
    assert _after(cmd, "--nproc-per-node") == "2" and _after(cmd, "--max-restarts") == "0"
    tail = cmd[cmd.index("--max-restarts") + 2:]
    assert tail == ["-m", "tunelab", "train", RECIPE, "--set", SETS[0], "--set", SETS[1]]
    assert "--multi_gpu" not in cmd and "--use_deepspeed" not in cmd  # strategy comes from the recipe


def test_static_and_c10d_rendezvous():
    static = Rendezvous(nproc_per_node=4, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29400,
                        rdzv_timeout_s=60)
    assert static.mode == "static" and not static.problems()
    cmd = torchrun_command(static, RECIPE, [], resume="auto")
    assert (_after(cmd, "--nnodes"), _after(cmd, "--node-rank"), _after(cmd, "--master-addr"),
            _after(cmd, "--master-port"), _after(cmd, "--rdzv-conf")) == ("2", "1", "10.0.0.1", "29400", "timeout=60")
    assert cmd[-2:] == ["--resume", "auto"]
    c10d = Rendezvous(nproc_per_node=8, nnodes=4, rdzv_endpoint="head:29500", rdzv_id="job7")
    assert c10d.mode == "c10d" and not c10d.problems()
    cmd = torchrun_command(c10d, RECIPE, [])
    assert (_after(cmd, "--rdzv-backend"), _after(cmd, "--rdzv-endpoint"), _after(cmd, "--rdzv-id"),
            _after(cmd, "--nnodes")) == ("c10d", "head:29500", "job7", "4")
    assert "--node-rank" not in cmd and "--master-addr" not in cmd
    # one node with an explicit port: static on that port (no --standalone)
    one = Rendezvous(nproc_per_node=2, master_port=29444)
    assert one.mode == "static" and _after(torchrun_command(one, RECIPE, []), "--master-port") == "29444"


def test_rendezvous_problems_are_all_reported():
    problems = Rendezvous(nproc_per_node=0, nnodes=2).problems()
    where = {p.where for p in problems}
    assert where == {"--nproc-per-node", "--node-rank", "--master-addr"}
    assert {p.where for p in Rendezvous(nnodes=2, node_rank=2, master_addr="h").problems()} == {"--node-rank"}
    bad = Rendezvous(rdzv_endpoint="head", master_addr="h", node_rank=0).problems()
    assert {p.where for p in bad} == {"--rdzv-endpoint", "--node-rank"}
    assert any("HOST:PORT" in p.what for p in bad)


def test_hostfile_parses_deepspeed_style(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# two nodes\nworker-1 slots=8\n\nworker-2   slots=4  # smaller\n")
    assert parse_hostfile(path) == [Host("worker-1", 8, 2), Host("worker-2", 4, 4)]


def test_hostfile_errors_name_the_line(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("worker-1 slots=8\nworker-2\nworker-3 slots=zero\nworker-1 slots=2\nworker-4 slots=0\n")
    with pytest.raises(UserError) as exc:
        parse_hostfile(path)
    text = exc.value.render()
    assert f"{path}:2: expected 'HOST slots=N'" in text
    assert f"{path}:3: slots must be a positive integer, got 'zero'" in text
    assert f"{path}:4: host worker-1 is listed again (first on line 1)" in text
    assert f"{path}:5: slots must be a positive integer" in text
    assert len(exc.value.problems) == 4
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(UserError, match="lists no hosts"):
        parse_hostfile(tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist"):
        parse_hostfile(tmp_path / "missing")


def test_hostfile_commands_per_host():
    hosts = [Host("node-a", 2, 1), Host("node-b", 1, 2)]
    cmds = hostfile_commands(hosts, RECIPE, SETS, env={"NCCL_SOCKET_IFNAME": "ib0"}, cwd="/shared/run",
                             python="/venv/bin/python")
    assert [h.name for h, _ in cmds] == ["node-a", "node-b"]
    for rank, (host, cmd) in enumerate(cmds):
        assert cmd[:4] == ["ssh", "-o", "BatchMode=yes", host.name]
        remote = shlex.split(cmd[4])
        assert remote[:3] == ["cd", "/shared/run", "&&"] and "NCCL_SOCKET_IFNAME=ib0" in remote
        assert remote[3:5] == ["exec", "env"]  # `exec` runs `env`, which sets the variables for torchrun
        torchrun = remote[remote.index("/venv/bin/python"):]
        assert torchrun[:3] == ["/venv/bin/python", "-m", "torch.distributed.run"]
        assert (_after(torchrun, "--nnodes"), _after(torchrun, "--node-rank"), _after(torchrun, "--master-addr"),
                _after(torchrun, "--nproc-per-node")) == ("2", str(rank), "node-a", str(host.slots))
        assert torchrun[-4:] == ["--set", SETS[0], "--set", SETS[1]]  # the space survives the remote shell
    local = hostfile_commands([Host("localhost", 2, 1)], RECIPE, [], python="py")
    assert local[0][1][:3] == ["py", "-m", "torch.distributed.run"]  # no ssh to this machine
    with pytest.raises(UserError, match="cannot reach"):
        hostfile_commands([Host("localhost", 1, 1), Host("node-b", 1, 2)], RECIPE, [])
    cmds = hostfile_commands([Host("localhost", 1, 1), Host("node-b", 1, 2)], RECIPE, [], master_addr="10.1.1.1")
    assert "--master-addr 10.1.1.1" in cmds[1][1][4]


def test_torchrun_failure_report_is_parsed():
    text = """
============================================================
tunelab FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-25_12:55:23
  host      : vm
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 26799)  (SIGTERM)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-25_12:55:23
  host      : node-b
  rank      : 3 (local_rank: 1)
  exitcode  : -9 (pid: 26800)  (SIGKILL)
  error_file: <N/A>
============================================================"""
    failure = parse_torchrun_failure(text)
    assert failure == Failure(rank=3, local_rank=1, host="node-b", pid=26800, exitcode=-9)
    assert failure.describe() == "rank 3 (local rank 1, host node-b, pid 26800) was killed by SIGKILL"
    assert Failure(rank=2, exitcode=1).describe() == "rank 2 exited with code 1"
    assert parse_torchrun_failure("Traceback ...") is None


def _render(**kw) -> str:
    job = SlurmJob(nodes=3, gpus_per_node=4, cpus_per_task=32, time="12:00:00", partition="gpu", account="proj",
                   job_name="sft", hf_home="/shared/hf", env={"NCCL_SOCKET_IFNAME": "ib0", "NCCL_DEBUG": "INFO"},
                   setup=["source /shared/venv/bin/activate"], **kw)
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
    assert args[-6:] == ["train", RECIPE, "--set", SETS[0], "--set", SETS[1]]
    assert "HF_HOME=/shared/hf" in (tmp_path / "srun.env").read_text().splitlines()
    (tmp_path / "srun.args").unlink()
    (bin_ / "scontrol").write_text("#!/bin/bash\nexit 1\n")  # no host to rendezvous on: a clear error, no srun
    proc = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "no MASTER_ADDR" in proc.stderr and not (tmp_path / "srun.args").exists()


def test_slurm_job_problems():
    with pytest.raises(UserError) as exc:
        render_sbatch(SlurmJob(nodes=0, gpus_per_node=0, time="soon", env={"1BAD": "x"}), RECIPE, [])
    assert {p.where for p in exc.value.problems} == {"--nnodes", "--gpus-per-node", "--time", "--env"}


def test_cli_launch_validates_first_and_renders(run_cli, tmp_path):
    rc, _, err = run_cli("launch", RECIPE, "--nproc-per-node", "2", "--set", "train.learning_rat=1", "--dry-run")
    assert rc == 2 and "train.learning_rat" in err  # the recipe error, before any command
    rc, _, err = run_cli("launch", RECIPE, "--nnodes", "2", "--dry-run")
    assert rc == 2 and "--node-rank" in err and "--master-addr" in err
    out_file = tmp_path / "job.sbatch"
    rc, out, err = run_cli("launch", RECIPE, "--slurm", "--nnodes", "2", "--gpus-per-node", "4", "-o", out_file,
                           "--set", "train.max_steps=10")
    assert rc == 0, err
    assert "--set train.max_steps=10" in out_file.read_text() and "2 node(s) x 4 GPU(s)" in out
    rc, out, err = run_cli("launch", RECIPE, "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                           "--nproc-per-node", "3", "--dry-run", "--env", "NCCL_DEBUG=INFO")
    assert rc == 0, err
    line = out.splitlines()[1]
    assert line.startswith("NCCL_DEBUG=INFO ") and "--node-rank 1 --nproc-per-node 3 --master-addr 10.0.0.1" in line
