"""torchrun command lines per rendezvous mode (launch/torchrun.py)."""

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
