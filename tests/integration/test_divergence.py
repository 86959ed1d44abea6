"""The divergence guard end to end through the CLI (train.on_divergence, the rule in specs.DivergenceSpec).

A run that blows up (the quickstart at learning rate 0.99, constant: the loss climbs from 7.4 past 100 within 15
steps) stops with exit 3, status "diverged", its last complete checkpoint kept and no final/; under ``warn`` it
trains on and is marked in summary.json and report.html; a run whose held-out perplexity ends far worse than it
started is never a plain "done" (exit 5, status "degraded", final/ kept). The same guard runs in our PPO trainer
(watching its step size, approx_kl) and under DeepSpeed, where the non-finite guard checks the loss and the
engine's gradient norm instead.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, tunelab_cmd

FAULTS = Path(__file__).parent / "faults"
BLOW_UP = ["--set", "train.learning_rate=0.99", "--set", "train.lr_scheduler=constant", "--set", "train.warmup_ratio=0",
           "--set", "train.report_to=[none]", "--set", "train.save_steps=5", "--set", "train.logging_steps=5"]


def _train(out: Path, *extra: str, recipe: str = "recipes/quickstart/sft.yaml", fault: str | None = None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if fault:
        env.update(TUNELAB_TEST_FAULT=fault, PYTHONPATH=f"{FAULTS}{os.pathsep}{env.get('PYTHONPATH', '')}")
    proc = subprocess.run([*tunelab_cmd(), "train", recipe, "--set", f"train.output_dir={out}", *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stdout, proc.stderr.replace("\r", "\n")  # progress bars redraw with \r


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_a_blowing_up_run_stops_with_its_last_checkpoint_and_no_final(tmp_path):
    out = tmp_path / "run"
    rc, _, err = _train(out, *BLOW_UP, "--set", "train.max_steps=40", "--set", "train.eval_before_train=false",
                        "--set", "data.eval=[]")
    assert rc == 3, err[-3000:]
    line = err[err.rindex("error (diverged): "):].splitlines()[0]
    assert "the training loss diverged" in line and "band" in line and "train.learning_rate" in line, line
    assert "Traceback" not in err
    summary = _summary(out)
    assert summary["status"] == "diverged" and summary["stopped"] in line
    stopped = summary["global_step"]
    assert stopped < 40 and not (out / "final").exists()
    kept = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert kept and max(kept) < stopped  # no checkpoint of the step that tripped the guard
    assert (out / f"checkpoint-{max(kept)}" / "tunelab_manifest.json").is_file()
    losses = [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert max(losses) > 10 * losses[0]  # it did blow up: the guard read the run, not a fixed step
    assert "diverged" in (out / "report.html").read_text()


@pytest.mark.slow
def test_warn_trains_on_and_marks_the_run_and_a_far_worse_eval_is_never_done(tmp_path):
    # warn: the loss guard and the held-out comparison are reported, the run finishes (exit 0) and is marked
    warned = tmp_path / "warn"
    rc, outp, err = _train(warned, *BLOW_UP, "--set", "train.max_steps=20", "--set", "train.on_divergence=warn")
    assert rc == 0, err[-3000:]
    summary = _summary(warned)
    assert summary["status"] == "done" and summary["divergence"][0]["step"] <= 20
    assert any("left its band" in w for w in summary["warnings"])
    assert any("held-out perplexity rose" in w for w in summary["warnings"])
    assert summary["eval_after"]["perplexity"] > 10 * summary["eval_before"]["perplexity"]
    assert "done with warnings" in outp and (warned / "final").is_dir()
    html = (warned / "report.html").read_text()
    assert "done (warnings)" in html and "held-out perplexity rose" in html

    # stop, with a band the loss never leaves: the held-out comparison alone marks it degraded (exit 5, final/ kept)
    degraded = tmp_path / "degraded"
    rc, outp, err = _train(degraded, *BLOW_UP, "--set", "train.max_steps=20", "--set", "train.divergence.factor=1000")
    assert rc == 5, err[-3000:]
    assert "error (degraded): finished, but held-out perplexity rose from" in err and "done:" not in outp
    assert _summary(degraded)["status"] == "degraded" and (degraded / "final").is_dir()


@pytest.mark.slow
def test_deepspeed_runs_are_guarded_too(tmp_path):
    """ZeRO-2 (one CPU process): a NaN loss stops the run at its step (the engine steps inside backward, so the loss
    and the engine's gradient norm are checked, not the gradients), and the divergence guard stops a blow-up."""
    zero = ["--set", "distributed.strategy=zero2", "--set", "train.eval_before_train=false", "--set", "data.eval=[]",
            "--set", "train.report_to=[none]", "--set", "train.logging_steps=1", "--set", "train.save_steps=2"]
    out = tmp_path / "nan"
    rc, _, err = _train(out, *zero, "--set", "train.max_steps=6", fault="nan_loss@4")
    assert rc == 4, err[-3000:]
    assert "error (nonfinite): step 4: the loss is not finite" in err and "Traceback" not in err
    assert not (out / "final").exists() and (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    assert _summary(out)["status"] == "nonfinite"

    out = tmp_path / "blowup"  # patience 1 at every step: the first log out of band stops it (a few steps)
    rc, _, err = _train(out, *BLOW_UP, *zero, "--set", "train.max_steps=8", "--set", "train.divergence.patience=1")
    assert rc == 3, err[-3000:]
    assert "error (diverged): " in err and _summary(out)["distributed"] == "DEEPSPEED"
    assert _summary(out)["global_step"] < 8 and not (out / "final").exists()

    # on_nonfinite: skip cannot be honoured there: refused before anything loads
    rc, _, err = _train(tmp_path / "skip", *zero, "--set", "train.on_nonfinite=skip")
    assert rc == 2 and "train.on_nonfinite: skip cannot run under zero2" in err, err[-2000:]


@pytest.mark.slow
def test_ppo_is_guarded_by_the_same_rule(quickstart_sft, tmp_path):
    """Our PPO trainer hands the rollout's KL to the reference per completion token to the same guard (its loss and
    approx_kl are no divergence signal, see methods/ppo): the quickstart at learning rate 0.99 collapses at its
    first update (KL 7 nats per token at step 2, from 0) and stops at step 4, before that step is checkpointed."""
    sft_dir, rc, _, err = quickstart_sft
    assert rc == 0, err[-2000:]
    out = tmp_path / "ppo"
    rc, _, err = _train(out, "--set", f"model.path={sft_dir}/final", "--set", "train.max_steps=12",
                        "--set", "train.save_steps=1", "--set", "method.eval_samples=1",
                        "--set", "train.learning_rate=0.99",
                        "--set", "train.eval_before_train=false", recipe="recipes/quickstart/ppo.yaml")
    assert rc == 3, err[-3000:]
    summary = _summary(out)
    assert summary["status"] == "diverged" and "the training kl_per_token diverged" in summary["stopped"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kl = {m["step"]: m["kl_per_token"] for m in rows if "kl_per_token" in m}
    stopped = summary["global_step"]
    assert kl[1] == pytest.approx(0, abs=1e-6) and stopped < 12
    assert all(kl[s] > 1.0 for s in range(stopped - 2, stopped + 1))  # 3 logs in a row above the band 0 + 2 x 0.5
    assert not (out / "final").exists() and not (out / f"checkpoint-{stopped}").exists()
    assert (out / f"checkpoint-{stopped - 1}").is_dir()
