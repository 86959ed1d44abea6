"""A run killed with SIGKILL resumes to the same result; a lock file reproduces the loss curve."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tunelab_cmd

COMMON = ["--set", "train.max_steps=30", "--set", "train.save_steps=10", "--set", "train.logging_steps=1",
          "--set", "train.eval_before_train=false", "--set", "train.report_to=[none]",
          "--set", "train.save_total_limit=null"]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_sigkill_then_resume_auto_matches_uninterrupted(run_cli, tmp_path):
    whole = tmp_path / "whole"
    rc, _, err = run_cli("train", "recipes/quickstart/sft.yaml", "--set", f"train.output_dir={whole}", *COMMON)
    assert rc == 0, err[-3000:]

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*tunelab_cmd(), "train", "recipes/quickstart/sft.yaml", "--set",
                             f"train.output_dir={killed}", *COMMON], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoint-10").is_dir():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-training, right after the first checkpoint appeared
    proc.wait()
    assert (killed / "checkpoint-10").is_dir(), "the run never reached its first checkpoint"
    assert not (killed / "final").exists(), "the run finished before it was killed"
    assert not any(p.name.startswith("checkpoint") and not (p / "trainer_state.json").is_file()
                   for p in killed.iterdir()), "a half-written checkpoint is visible"

    # without --resume, an existing run is not overwritten
    rc, _, err = run_cli("train", "recipes/quickstart/sft.yaml", "--set", f"train.output_dir={killed}", *COMMON)
    assert rc == 2 and "--resume auto" in err
    rc, out, err = run_cli("train", "recipes/quickstart/sft.yaml", "--set", f"train.output_dir={killed}", *COMMON,
                           "--resume", "auto")
    assert rc == 0, err[-3000:]
    assert "resuming from" in out
    a, b = losses(whole), losses(killed)
    assert max(a) == max(b) == 30
    assert b[30] == pytest.approx(a[30], rel=1e-4, abs=1e-5)
    assert json.loads((killed / "summary.json").read_text())["global_step"] == 30


@pytest.mark.slow
def test_lock_file_reproduces_loss_curve(run_cli, tmp_path):
    first = tmp_path / "first"
    rc, _, err = run_cli("train", "recipes/quickstart/sft.yaml", "--set", f"train.output_dir={first}", *COMMON)
    assert rc == 0, err[-3000:]
    lock = first / "recipe.lock.yaml"
    text = lock.read_text()
    assert "tunelab_lock" in text and "sha256" in text and "transformers" in text
    again = tmp_path / "again"
    rc, _, err = run_cli("train", str(lock), "--set", f"train.output_dir={again}")
    assert rc == 0, err[-3000:]
    a, b = losses(first), losses(again)
    assert a.keys() == b.keys() and len(a) == 30
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step


DPO_SETS = ["model.path=builtin:tiny-llama", "data.eval=[]",
            'data.train=[{source: "builtin:quickstart/preference", format: preference, samples: 32}]',
            "train.max_steps=4", "train.save_steps=2", "train.save_total_limit=null", "train.logging_steps=1",
            "train.eval_before_train=false", "train.report_to=[none]"]


def test_dpo_resume_auto_restores_the_optimizer_state(tmp_path, capsys):
    """DPO cut after checkpoint-2 and resumed with --resume auto (run_training in this process) ends where the uncut
    run ends: the same step-3/4 losses, the same final weights and the same Adam moments in checkpoint-4.

    The tolerances are 1e-5 (measured: equal to the last bit). A resume that loses the optimizer state moves the
    weights by about lr per step (at the recipe's lr 1e-4, measured: 1.7e-4 at most after 2 steps, close to a
    1e-4 check), and restarts the moments: checkpoint-4's exp_avg and exp_avg_sq then differ by 84% and 99.8% of
    their largest entry, and its step counts 2, not 4.
    """
    from safetensors.torch import load_file

    from tunelab.train import run_training

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_training("recipes/quickstart/dpo.yaml", [*DPO_SETS, f"train.output_dir={whole}"])
    shutil.copytree(whole, cut, ignore=shutil.ignore_patterns("final", "checkpoint-4", "summary.json"))
    capsys.readouterr()
    run_training("recipes/quickstart/dpo.yaml", [*DPO_SETS, f"train.output_dir={cut}"], resume="auto")
    said = capsys.readouterr().out
    assert f"resuming from {cut / 'checkpoint-2'}" in said
    # resumed, not restarted (which ends with the same weights, losses and moments): the trainer loaded step 2 and
    # says where in the data it goes on (32 pairs / batch 8 = 4 micro-batches per epoch), and metrics.jsonl says so
    assert "resumed at step 2 of 4 (epoch 0.500); data: epoch 1, continuing after micro-batch 2 of 4" in said, said
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("event") == "resumed"] == [2]

    a, b = losses(whole), losses(cut)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-7), step
    got, want = load_file(cut / "final" / "model.safetensors"), load_file(whole / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)
    opt_b = torch.load(cut / "checkpoint-4" / "optimizer.pt", weights_only=True)["state"]
    opt_a = torch.load(whole / "checkpoint-4" / "optimizer.pt", weights_only=True)["state"]
    assert opt_a.keys() == opt_b.keys() and len(opt_a) > 0
    for i in opt_a:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            x, y = opt_a[i][key].float(), opt_b[i][key].float()
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()), msg=f"param {i} {key}")
