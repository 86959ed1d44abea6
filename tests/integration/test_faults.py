"""The faults of a long run, end to end through the CLI: each leaves a resumable run and loses no work.

SIGTERM (a checkpoint at the step, exit 75, resume = the uncut run), a kill while a checkpoint is written, a
corrupt last checkpoint (detected, the one before is used), a full disk, a NaN gradient (stop or skip) and a
rank that hangs (every rank's stack, the laggard named). Faults other than the signals are injected by
``faults/sitecustomize.py`` (on PYTHONPATH only here).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, tunelab_cmd

FAULTS = Path(__file__).parent / "faults"
RECIPE = "recipes/quickstart/sft.yaml"
COMMON = ["--set", "train.max_steps=30", "--set", "train.save_steps=10", "--set", "train.logging_steps=1",
          "--set", "train.eval_before_train=false", "--set", "train.report_to=[none]",
          "--set", "train.save_total_limit=null", "--set", "data.eval=[]"]


def _train(out: Path, *extra: str, fault: str | None = None, resume: bool = False, timeout: float = 600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if fault:
        env.update(TUNELAB_TEST_FAULT=fault, PYTHONPATH=f"{FAULTS}{os.pathsep}{env.get('PYTHONPATH', '')}")
    cmd = [*tunelab_cmd(), "train", RECIPE, "--set", f"train.output_dir={out}", *COMMON, *extra,
           *(["--resume", "auto"] if resume else [])]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def assert_same_run(a: Path, b: Path, resumed_at: int | None = None, said: str = "") -> None:
    """The resumed run's loss at every step and its final weights are the uncut run's (fp32 on a CPU: measured equal
    to the last bit, max |difference| 0.0; the tolerance 1e-6 leaves room for another BLAS build only).

    With ``resumed_at``: the run really resumed there, rather than silently starting over (which ends with the same
    weights and losses): the resumed process said which step and data position it picked up
    (``said``: its stdout) and metrics.jsonl records the resume once, with every step logged once.
    """
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 31))
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-6, abs=1e-7), step
    wa, wb = weights(a / "final"), weights(b / "final")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max().item() <= 1e-6, name
    if resumed_at is not None:
        rows = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r.get("event") == "resumed"] == [resumed_at]
        assert len([r for r in rows if "loss" in r]) == 30  # no step trained (and logged) twice
        assert f"resumed at step {resumed_at} of 30 (epoch " in said, said[-2000:]
        # packed rows: the micro-batches per epoch come from the run; no accumulation, so one per step
        epoch, into, per_epoch = map(int, re.search(r"data: epoch (\d+), continuing after micro-batch (\d+) of (\d+)",
                                                    said).groups())
        assert (epoch, into) == (resumed_at // per_epoch + 1, resumed_at % per_epoch), said[-2000:]


@pytest.fixture(scope="module")
def uncut(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uncut") / "run"
    rc, _, err = _train(out)
    assert rc == 0, err[-3000:]
    return out


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resumes_to_the_uncut_run(uncut, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*tunelab_cmd(), "train", RECIPE, "--set", f"train.output_dir={out}", *COMMON], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and any(s >= 3 for s in losses(out)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # what Slurm sends before the time limit
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    marker = json.loads((out / "preempted.json").read_text())
    step = marker["step"]
    assert 3 <= step < 30 and marker["signal"] == "SIGTERM"
    assert (out / f"checkpoint-{step}" / "tunelab_manifest.json").is_file()  # a complete checkpoint of that step
    assert not (out / "final").exists()
    assert f"stopped at step {step}" in err and "--resume auto" in err

    rc, outp, err = _train(out, resume=True)
    assert rc == 0, err[-3000:]
    assert f"resuming from {out / f'checkpoint-{step}'}" in outp
    assert not (out / "preempted.json").exists()
    assert_same_run(uncut, out, resumed_at=step, said=outp)


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_leaves_the_previous_one(uncut, tmp_path):
    out = tmp_path / "run"
    rc, _, _ = _train(out, fault="kill_in_save@20")
    assert rc == -signal.SIGKILL
    assert (out / "checkpoint-10").is_dir() and not (out / "checkpoint-20").exists()
    assert any((out / ".staging").rglob("*"))  # the half-written one, where resume never looks
    rc, outp, err = _train(out, resume=True)
    assert rc == 0, err[-3000:]
    assert f"resuming from {out / 'checkpoint-10'}" in outp
    assert_same_run(uncut, out, resumed_at=10, said=outp)


@pytest.mark.slow
def test_corrupt_last_checkpoint_is_detected_and_the_one_before_used(uncut, tmp_path):
    out = tmp_path / "run"
    rc, _, _ = _train(out, fault="exit_after_save@20")
    assert rc == -signal.SIGKILL and (out / "checkpoint-20").is_dir()
    shard = out / "checkpoint-20" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a truncated copy, a bad disk
    rc, outp, err = _train(out, resume=True)
    assert rc == 0, err[-3000:]
    assert "checkpoint-20 is not a complete checkpoint (model.safetensors has" in outp + err
    assert f"resuming from {out / 'checkpoint-10'}" in outp
    assert (out / ".corrupt" / "checkpoint-20").is_dir()
    assert_same_run(uncut, out, resumed_at=10, said=outp)

    # named explicitly, a corrupt checkpoint is refused before anything loads
    bad = out / ".corrupt" / "checkpoint-20"
    rc, _, err = _train(tmp_path / "x", "--resume", str(bad))
    assert rc == 2 and "is not a complete checkpoint: model.safetensors has" in err, err[-2000:]


@pytest.mark.slow
def test_full_disk_while_checkpointing_keeps_the_previous_one(uncut, tmp_path):
    out = tmp_path / "run"
    rc, _, err = _train(out, fault="enospc@20")
    assert rc == 1
    assert "writing checkpoint-20 failed (No space left on device)" in err
    assert "checkpoint-10, is intact" in err and "Traceback" not in err
    assert (out / "checkpoint-10").is_dir() and not (out / "checkpoint-20").exists()
    assert not (out / ".staging").exists() and not (out / "final").exists()
    rc, _, err = _train(out, resume=True)
    assert rc == 0, err[-3000:]
    assert_same_run(uncut, out)


@pytest.mark.slow
def test_nan_gradient_stops_naming_the_step_or_is_skipped_and_counted(tmp_path):
    stop = tmp_path / "stop"
    rc, _, err = _train(stop, fault="nan_grad@15")
    assert rc == 4  # its own exit code (1 is a crash)
    assert "error (nonfinite): step 15: the loss or a gradient is not finite" in err and "Traceback" not in err
    assert json.loads((stop / "summary.json").read_text())["status"] == "nonfinite"
    assert (stop / "checkpoint-10").is_dir() and not (stop / "final").exists()
    assert max(losses(stop)) == 14  # no step past the bad one

    skip = tmp_path / "skip"
    rc, outp, err = _train(skip, "--set", "train.on_nonfinite=skip", fault="nan_grad@15")
    assert rc == 0, err[-3000:]
    assert "step 15: non-finite gradient, update skipped" in outp + err
    summary = json.loads((skip / "summary.json").read_text())
    assert summary["nonfinite_skipped_steps"] == [15] and summary["global_step"] == 30
    final = weights(skip / "final")
    assert all(bool(t.isfinite().all()) for t in final.values())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_hung_rank_is_named_and_every_rank_stack_written(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNELAB_TEST_FAULT": "hang@1:4",
           "PYTHONPATH": f"{FAULTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [*tunelab_cmd(), "launch", RECIPE, "--nproc-per-node", "2", "--env", "OMP_NUM_THREADS=1",
           "--env", "TUNELAB_COLLECTIVE_TIMEOUT_S=12", "--env", "TUNELAB_HANG_DUMP_S=4",
           "--set", f"train.output_dir={out}", *COMMON]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "hang: rank(s) 1 did not arrive at collective" in text, text[-4000:]
    final = [line for line in proc.stderr.splitlines() if line.startswith("error: ")][-1]
    assert "rank 1 did not arrive at a collective" in final, final
    stacks = {r: (out / "stacks" / f"rank-{r}.txt").read_text() for r in (0, 1)}
    assert "sitecustomize.py" in stacks[1] and "training_step" in stacks[1]  # where rank 1 is stuck
    assert "Thread" in stacks[0] or "Current thread" in stacks[0]
    assert time.monotonic() - start < 200
