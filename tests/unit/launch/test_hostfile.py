"""Hostfiles (launch/hostfile.py): parsing, errors naming the line, one command per host."""

import shlex

import pytest

from tunelab.errors import UserError
from tunelab.launch.hostfile import Host, hostfile_commands, parse_hostfile


RECIPE = "recipes/quickstart/sft.yaml"


SETS = ["train.max_steps=3", "train.output_dir=runs/a b"]


def _after(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


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
