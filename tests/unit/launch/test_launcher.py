"""`tunelab launch` (launch/launcher.py): the recipe validated first, then the command rendered."""


RECIPE = "recipes/quickstart/sft.yaml"


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
