"""Online RL on CPU from the quickstart SFT model: PPO and GRPO raise the reward, also with 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
    eos = json.loads((tmp_path / recipe / "final" / "generation_config.json").read_text())["eos_token_id"]
    assert 2 in ([eos] if isinstance(eos, int) else eos)  # <|im_end|>, the template's end of turn: it stops
    assert "## Results" in (tmp_path / recipe / "final" / "README.md").read_text()  # tunelab's card


SEEDED = Path(__file__).resolve().parent / "grpo_seeded_sampling.py"  # GRPO sampled per completion, see there


def _launch(launcher: list[str], recipe: str, sft_dir: Path, out: Path, *sets: str,
            extra: tuple[str, ...] = (), entry: tuple[str, ...] = ("-m", "tunelab")) -> subprocess.CompletedProcess:
    """``accelerate launch <launcher> --num_processes 2 -m tunelab train`` on a quickstart recipe (``entry``: what
    runs instead of ``-m tunelab``; without ``launcher``, one plain process)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    launch = [str(accelerate), "launch", *launcher, "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"] if launcher else [sys.executable]
    cmd = [*launch, *entry, "train",
           f"recipes/quickstart/{recipe}.yaml", "--set", f"model.path={sft_dir}/final",
           "--set", f"train.output_dir={out}", "--set", "method.eval_samples=1"]
    for s in sets:
        cmd += ["--set", s]
    cmd += list(extra)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=dict(os.environ))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


LAUNCHERS = {"MULTI_CPU": ["--multi_gpu"], "DEEPSPEED": ["--use_deepspeed", "--zero_stage", "2"]}


GRPO_SETS = ("train.max_steps=3", "train.save_steps=2")
NOT_COMPARED = {"step", "epoch", "step_time", "learning_rate"}  # the clock, and what is the same by setting


@pytest.fixture(scope="module")
def grpo_one_process(quickstart_sft, tmp_path_factory) -> Path:
    """GRPO in one process over the global batch of the 2-process runs (64 completions: 2 x 32), each completion
    sampled from a seed of its own (grpo_seeded_sampling.py), as the 2-process runs below sample."""
    sft_dir, rc, _, err = quickstart_sft
    assert rc == 0, err[-2000:]
    out = tmp_path_factory.mktemp("grpo-one-process") / "grpo"
    proc = _launch([], "grpo", sft_dir, out, *GRPO_SETS, "train.batch_size=64", entry=(str(SEEDED),))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["processes"] == 1
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "distributed"), [("grpo", "MULTI_CPU"), ("grpo", "DEEPSPEED")])
def test_two_processes(quickstart_sft, grpo_one_process, tmp_path, recipe, distributed):
    """accelerate launch, 2 CPU processes (DDP or ZeRO-2 over gloo): one process group, completes, final/ once, and
    trains as one process does on the same global batch.

    TRL samples each process's completions from a seed of that process, so 1 and 2 processes would draw different
    completions and nothing after sampling could be compared; both runs here sample each completion alone from a
    seed of its prompt and place in its group (grpo_seeded_sampling.py), so they draw the same ones. Then rewards,
    advantages, the loss over both processes' tokens, the all-reduced gradient and the steps must agree: every
    logged number of every step (reward, its std, loss, grad norm, entropy, clip ratios, lengths, tokens), to float
    rounding (measured under DDP: rewards, lengths and token counts equal, loss within 4e-9, grad norm 3e-7 of 0.59,
    entropy 1.2e-7), and the final weights. (PPO runs both ways in the next test, number for number.)
    """
    sft_dir, rc, _, err = quickstart_sft
    assert rc == 0, err[-2000:]
    out = tmp_path / recipe
    # --multi_gpu is accelerate's torchrun launcher; on a machine without CUDA tunelab forms a gloo group
    proc = _launch(LAUNCHERS[distributed], recipe, sft_dir, out, *GRPO_SETS, entry=(str(SEEDED),))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["processes"], summary["distributed"]) == (2, distributed)  # not two runs side by side
    assert (out / "final" / "model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    assert [m["step"] for m in _metrics(out) if "reward" in m] == [1, 2, 3]  # one writer, not one per process
    assert proc.stdout.count("[tunelab] done:") == 1

    one, two = ([m for m in _metrics(run) if "reward" in m] for run in (grpo_one_process, out))
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        keys = {k for k in a.keys() & b.keys() if isinstance(a[k], (int, float))} - NOT_COMPARED
        assert {"reward", "reward_std", "loss", "grad_norm"} <= keys, sorted(keys)
        for k in sorted(keys):
            assert b[k] == pytest.approx(a[k], abs=1e-6, rel=1e-5), (a["step"], k, a[k], b[k])
    assert any(m["reward_std"] > 0 and m["grad_norm"] > 0 for m in one)  # groups differed: the policy was pushed
    # the weights: 3 steps moved them by up to 3e-4; 1 and 2 processes end within 3.0e-6 of each other (DDP, ZeRO-2)
    w1, w2 = (load_file(run / "final" / "model.safetensors") for run in (grpo_one_process, out))
    start = load_file(sft_dir / "final" / "model.safetensors")
    assert max((w1[k] - start[k]).abs().max().item() for k in w1) > 1e-4
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=0, msg=name)
    # ZeRO-2's save also writes the tied output embedding: the input embedding's copy, nothing else
    assert w2.keys() - w1.keys() <= {"lm_head.weight"} and w1.keys() <= w2.keys()
    if "lm_head.weight" in w2:
        assert torch.equal(w2["lm_head.weight"], w2["model.embed_tokens.weight"])


@pytest.mark.slow
def test_ppo_deepspeed_zero2_matches_ddp_and_resumes(quickstart_sft, tmp_path):
    """PPO under DeepSpeed ZeRO-2 (2 CPU processes) logs what DDP logs, and resumes from its checkpoint.

    Gradient clipping is off for the comparison: DDP clips the policy and the critic separately,
    the DeepSpeed engine both together; everything else is the same arithmetic, so the logged
    numbers agree to float rounding (abs 1e-5).
    """
    sft_dir, rc, _, err = quickstart_sft
    assert rc == 0, err[-2000:]
    sets = ("train.max_steps=3", "train.save_steps=2", "train.max_grad_norm=0", "train.eval_before_train=false")
    runs = {}
    for name, launcher in (("ddp", LAUNCHERS["MULTI_CPU"]), ("zero2", LAUNCHERS["DEEPSPEED"])):
        proc = _launch(launcher, "ppo", sft_dir, tmp_path / name, *sets)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = _metrics(tmp_path / name)
    for name, distributed in (("ddp", "MULTI_CPU"), ("zero2", "DEEPSPEED")):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert (summary["processes"], summary["distributed"]) == (2, distributed)  # one group, not two runs
        assert (tmp_path / name / "final" / "model.safetensors").is_file()
        assert [m["step"] for m in runs[name]] == [1, 2, 3]  # one writer, not one per process
    assert (tmp_path / "zero2" / "checkpoint-2" / "deepspeed").is_dir()  # the engine's optimizer shards
    keys = ("reward", "kl", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl", "explained_variance")
    for a, b in zip(runs["ddp"], runs["zero2"]):
        for k in keys:
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["step"], k)
    assert runs["zero2"][1]["policy_loss"] != runs["zero2"][0]["policy_loss"]  # the policy did move

    import shutil

    shutil.rmtree(tmp_path / "zero2" / "final")  # as if killed after checkpoint-2 was written
    proc = _launch(LAUNCHERS["DEEPSPEED"], "ppo", sft_dir, tmp_path / "zero2", *sets,
                   extra=("--resume", "auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "checkpoint-2" in proc.stdout
    resumed = [m for m in _metrics(tmp_path / "zero2") if m.get("event") != "resumed"]
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for k in keys:  # step 3 after the resume is step 3 of the uncut run: weights, optimizer shards, KL, seeds
        assert resumed[2][k] == pytest.approx(runs["zero2"][2][k], abs=1e-5), k


@pytest.mark.slow
def test_ppo_resumes_from_its_last_checkpoint(run_cli, quickstart_sft, tmp_path):
    """A PPO run killed after its checkpoint at step 2 resumes there, logs what the uncut run logged and ends with
    the uncut run's final weights (fp32 CPU, tolerance 1e-6; measured equal to the last bit). It says which step and
    data position it picked up, and metrics.jsonl records the resume: a run that silently started over (same seeds,
    same weights at the end) fails here."""
    import shutil

    from safetensors.torch import load_file

    sft_dir, rc, _, err = quickstart_sft
    assert rc == 0, err[-2000:]
    out = tmp_path / "ppo"
    extra = ("--set", "train.max_steps=4", "--set", "train.save_steps=2", "--set", "method.eval_samples=1",
             "--set", "train.eval_before_train=false")
    _train(run_cli, "ppo", sft_dir, out, *extra)
    whole = _metrics(out)
    uncut = load_file(out / "final" / "model.safetensors")
    shutil.rmtree(out / "final")  # as if killed after checkpoint-2 was written
    shutil.rmtree(out / "checkpoint-4", ignore_errors=True)
    rc, stdout, stderr = run_cli("train", "recipes/quickstart/ppo.yaml", "--set", f"model.path={sft_dir}/final",
                                 "--set", f"train.output_dir={out}", *extra, "--resume", "auto")
    assert rc == 0, stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-2'}" in stdout
    # 2 steps x 16 prompts of the 36-row quickstart rl set
    assert "resumed at step 2 of 4 (KL coefficient 0.1); data: epoch 1, continuing after prompt 32 of 36" in stdout
    rows = _metrics(out)
    assert [m["step"] for m in rows if m.get("event") == "resumed"] == [2]
    resumed = [m for m in rows if m.get("event") != "resumed"]
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole[2:], resumed[2:]):
        assert a["reward"] == b["reward"] and a["policy_loss"] == pytest.approx(b["policy_loss"], abs=1e-6)
    final = load_file(out / "final" / "model.safetensors")
    assert final.keys() == uncut.keys()
    for name in uncut:
        assert (final[name] - uncut[name]).abs().max().item() <= 1e-6, name
