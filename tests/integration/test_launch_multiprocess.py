"""`tunelab launch` end to end on CPU (gloo): a killed rank fails the job fast, two "nodes" on 127.0.0.1 train."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent.parent
RECIPE = "recipes/quickstart/sft.yaml"


def tunelab_cmd() -> list[str]:
    exe = shutil.which("tunelab", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "tunelab"]


def _start(out: Path, *args: str) -> subprocess.Popen:
    cmd = [*tunelab_cmd(), "launch", RECIPE, "--set", f"train.output_dir={out}", "--set",
           "train.eval_before_train=false", *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))


def _collect(proc: subprocess.Popen) -> tuple[list[str], list[str]]:
    """Read both streams in threads (a full pipe would stall the job); returns the growing line lists."""
    out: list[str] = []
    err: list[str] = []
    for stream, sink in ((proc.stdout, out), (proc.stderr, err)):
        threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")), daemon=True).start()
    return out, err


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.Error:
            continue
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_rank_fails_the_job_within_60s_naming_the_rank(tmp_path):
    proc = _start(tmp_path / "run", "--nproc-per-node", "2", "--set", "train.max_steps=5000", "--set",
                  "train.save_steps=100000", "--set", "train.logging_steps=1")
    out, err = _collect(proc)
    deadline = time.monotonic() + 240
    while not any("process(es), distributed" in line for line in out):  # the trainer is built: training starts
        assert proc.poll() is None, "".join(err)[-3000:]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.5)
    time.sleep(3)  # a few optimizer steps in
    assert proc.poll() is None, "".join(err)[-3000:]
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    rc = proc.wait(timeout=120)
    elapsed = time.monotonic() - killed
    time.sleep(0.5)  # let the reader threads drain
    text = "".join(err)
    assert rc != 0
    assert elapsed < 60, elapsed
    last = [line for line in err if line.startswith("error: ")][-1]
    assert f"rank 1 (local rank 1, host {socket.getfqdn()}, pid {victim}) was killed by SIGKILL" in last, text[-3000:]
    assert not psutil.pid_exists(victim) and not [c for c in psutil.Process().children(recursive=True)
                                                   if c.pid != proc.pid and "tunelab" in " ".join(c.cmdline())]
    print(f"killed rank 1 -> launcher exited {rc} after {elapsed:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_on_localhost(tmp_path):
    """Two `tunelab launch --nnodes 2` processes (one per "node", one rank each) form one 2-process job."""
    port = _free_port()
    out_dir = tmp_path / "run"  # a shared filesystem, as on a cluster: only global rank 0 writes
    nodes = [_start(out_dir, "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                    "--master-port", str(port), "--nproc-per-node", "1", "--rdzv-timeout", "120",
                    "--env", "OMP_NUM_THREADS=1", "--set", "train.max_steps=3")  # 2 cores, 2 "nodes"
             for rank in (0, 1)]
    results = [node.communicate(timeout=240) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0, stderr[-3000:]
    assert "rank(s) 0 of a 2-process job finished" in results[0][1]
    assert "rank(s) 1 of a 2-process job finished" in results[1][1]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert (summary["processes"], summary["distributed"], summary["global_step"]) == (2, "MULTI_CPU", 3)
    assert (out_dir / "final" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_unreachable_master_is_an_error_naming_it(tmp_path):
    port = _free_port()  # nothing listens there
    proc = _start(tmp_path / "run", "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
                  "--master-port", str(port), "--rdzv-timeout", "5", "--nproc-per-node", "1")
    _, stderr = proc.communicate(timeout=100)
    assert proc.returncode != 0
    assert f"could not reach the master 127.0.0.1:{port}" in stderr.splitlines()[-1], stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hostfile_starts_each_node_over_ssh(tmp_path):
    """A hostfile of two hosts that are not this machine: each node's torchrun goes through ssh.

    A stand-in ``ssh`` (first on PATH) runs the remote command here in a bare environment, as a
    login on another node would (only HOME and PATH): the job must carry its own working
    directory, interpreter path and forwarded variables. The master is 127.0.0.2, an address of
    this machine that tunelab does not treat as local (a hostfile with remote hosts refuses a
    loopback master they could not reach).
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "ssh-calls.txt"
    ssh = bin_dir / "ssh"
    ssh.write_text("#!/bin/sh\n"
                   "# stand-in for: ssh -o BatchMode=yes HOST COMMAND\n"
                   f'printf "%s\\t%s\\n" "$3" "$4" >> {calls}\n'
                   'exec env -i HOME="$HOME" PATH=/usr/bin:/bin /bin/sh -c "$4"\n')
    ssh.chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes, one process each\nnode-a slots=1\nnode-b slots=1\n")
    out_dir = tmp_path / "run"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1")
    cmd = [*tunelab_cmd(), "launch", RECIPE, "--hostfile", str(hostfile), "--master-addr", "127.0.0.2",
           "--master-port", str(_free_port()), "--rdzv-timeout", "120", "--env", "OMP_NUM_THREADS=1",
           "--set", f"train.output_dir={out_dir}", "--set", "train.eval_before_train=false",
           "--set", "train.max_steps=3"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls_by_host = dict(line.split("\t", 1) for line in calls.read_text().splitlines())  # both start at once
    assert sorted(calls_by_host) == ["node-a", "node-b"]
    for rank, host in enumerate(["node-a", "node-b"]):  # node ranks follow the hostfile's order
        remote = calls_by_host[host]
        assert remote.startswith(f"cd {REPO} && exec env ") and "HF_HUB_OFFLINE=1" in remote and "OMP_NUM_THREADS=1" in remote
        assert f"--node-rank {rank}" in remote and "--master-addr 127.0.0.2" in remote, remote
    summary = json.loads((out_dir / "summary.json").read_text())
    assert (summary["processes"], summary["distributed"], summary["global_step"]) == (2, "MULTI_CPU", 3)
