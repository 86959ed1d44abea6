"""Online RL on CPU from the quickstart SFT model: PPO and GRPO raise the reward, also with 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent


def _train(run_cli, recipe, sft_dir, out, *extra):
    rc, stdout, stderr = run_cli("train", f"recipes/quickstart/{recipe}.yaml", "--set", f"model.path={sft_dir}/final",
                                 "--set", f"train.output_dir={out}", *extra)
    assert rc == 0, stderr[-3000:]
    return json.loads((out / "summary.json").read_text()), stdout


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["ppo", "grpo"])
def test_reward_rises(run_cli, quickstart_sft, tmp_path, recipe):
    sft_dir, rc, _, err = quickstart_sft
    assert rc == 0, err[-2000:]
    summary, stdout = _train(run_cli, recipe, sft_dir, tmp_path / recipe)
    rise = summary["train_reward"]
    assert rise["last"] > rise["first"] + 0.1, rise  # mean reward, first vs last 10% of steps
    sampled = summary["eval_sampled_reward"]
    assert sampled["after"] > sampled["before"] + 0.05, sampled  # held-out prompts, sampled as in training
    assert "held-out mean reward" in stdout and "train reward: first 10% of logged steps" in stdout
    metrics = [json.loads(line) for line in (tmp_path / recipe / "metrics.jsonl").read_text().splitlines()]
    keys = {"reward", "kl", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl", "explained_variance"}
    if recipe == "ppo":
        assert keys <= set(metrics[-1]), set(metrics[-1])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / recipe / "final")  # plain HF format


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["ppo", "grpo"])
def test_two_processes(quickstart_sft, tmp_path, recipe):
    """accelerate launch, 2 CPU processes (gloo): the run completes and saves final/ once."""
    sft_dir, rc, _, err = quickstart_sft
    assert rc == 0, err[-2000:]
    out = tmp_path / recipe
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "tunelab", "train", f"recipes/quickstart/{recipe}.yaml",
           "--set", f"model.path={sft_dir}/final", "--set", f"train.output_dir={out}", "--set", "train.max_steps=3",
           "--set", "train.save_steps=2", "--set", "method.eval_samples=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "final" / "model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "reward" in m] == [1, 2, 3]  # one writer, not one per process
    assert proc.stdout.count("[tunelab] done:") == 1


@pytest.mark.slow
def test_ppo_resumes_from_its_last_checkpoint(run_cli, quickstart_sft, tmp_path):
    """A PPO run cut after its checkpoint at step 2 resumes there and logs what the uncut run logged."""
    sft_dir, rc, _, err = quickstart_sft
    assert rc == 0, err[-2000:]
    out = tmp_path / "ppo"
    extra = ("--set", "train.max_steps=4", "--set", "train.save_steps=2", "--set", "method.eval_samples=1")
    _train(run_cli, "ppo", sft_dir, out, *extra)
    whole = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    import shutil

    shutil.rmtree(out / "final")  # as if killed after checkpoint-2 was written
    rc, stdout, stderr = run_cli("train", "recipes/quickstart/ppo.yaml", "--set", f"model.path={sft_dir}/final",
                                 "--set", f"train.output_dir={out}", *extra, "--resume", "auto")
    assert rc == 0, stderr[-3000:]
    assert "resuming from" in stdout and "checkpoint-2" in stdout
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole[2:], resumed[2:]):
        assert a["reward"] == b["reward"] and a["policy_loss"] == pytest.approx(b["policy_loss"], abs=1e-5)
