"""Resume exactness, measured: a run cut after a checkpoint and resumed with --resume auto against the uncut run.

    python scripts/resume_exactness.py sft|dpo|ppo [--sft-run RUN]

Trains the quickstart recipe uncut, keeps its final weights, deletes final/ and every checkpoint after the cut
(what a kill right after that checkpoint leaves), resumes with ``--resume auto`` and prints the line the resumed
run said about where it picked up and the largest |difference| of any final weight (fp32, CPU). PPO starts from
a trained quickstart SFT model (``--sft-run``, default runs/quickstart-sft). docs/distributed.md quotes its output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
TUNELAB = str(Path(sys.executable).parent / "tunelab")


def train(*args: str) -> str:
    proc = subprocess.run([TUNELAB, "train", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=["sft", "dpo", "ppo"])
    parser.add_argument("--sft-run", default="runs/quickstart-sft")
    a = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix=f"resume-{a.method}-")) / "run"
    common = ["--set", f"train.output_dir={out}", "--set", "train.report_to=[none]", "--set", "train.eval_before_train=false",
              "--set", "train.save_total_limit=null"]
    if a.method == "sft":  # packed rows, 30 steps, cut after step 10
        args = ["recipes/quickstart/sft.yaml", *common, "--set", "train.max_steps=30", "--set", "train.save_steps=10",
                "--set", "data.eval=[]", "--set", "train.logging_steps=1"]
        total, cut = 30, 10
    elif a.method == "dpo":
        args = ["recipes/quickstart/dpo.yaml", *common, "--set", "model.path=builtin:tiny-llama", "--set", "data.eval=[]",
                "--set", 'data.train=[{source: "builtin:quickstart/preference", format: preference, samples: 32}]',
                "--set", "train.max_steps=4", "--set", "train.save_steps=2", "--set", "train.logging_steps=1"]
        total, cut = 4, 2
    else:
        args = ["recipes/quickstart/ppo.yaml", *common, "--set", f"model.path={a.sft_run}/final",
                "--set", "train.max_steps=4", "--set", "train.save_steps=2", "--set", "method.eval_samples=1"]
        total, cut = 4, 2
    train(*args)
    uncut = load_file(out / "final" / "model.safetensors")
    shutil.rmtree(out / "final")
    for step in range(cut + 1, total + 1):
        shutil.rmtree(out / f"checkpoint-{step}", ignore_errors=True)
    said = train(*args, "--resume", "auto")
    resumed = load_file(out / "final" / "model.safetensors")
    print(next(line for line in said.splitlines() if "resumed at step" in line))
    diff = max((resumed[k] - uncut[k]).abs().max().item() for k in uncut)
    print(f"{a.method}: {len(uncut)} tensors, max |final weight difference| resumed vs uncut = {diff}")
    shutil.rmtree(out.parent)


if __name__ == "__main__":
    main()
