"""The ``distributed:`` block end to end on CPU (gloo): 2 processes under DDP, ZeRO-2 and ZeRO-3, no accelerate flag.

The quickstart SFT and DPO recipes run for 3 steps with 2 processes of micro batch 4, launched by
plain torchrun (SFT under ZeRO-2 and DPO under DDP as 2 "nodes" x 1 process on 127.0.0.1), and are
compared with one process of micro batch 8: the same global batch of the same rows (accelerate
hands rank r the r-th half of each single-process batch), so the logged losses must agree step for
step, and ZeRO-3's final/ must hold whole weights equal to the single-process ones. Each run is
made once per module and saves a checkpoint at step 2, from which the resume tests restart.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
STEPS = 3
# All runs are fp32 and see the same rows in the same order: only the order of floating-point
# sums differs (a gloo all-reduce of two half-batch gradients, or ZeRO's bucketed reduce-scatter,
# against one whole-batch backward). Measured: losses agree to ~1e-7 and weights to ~5e-7 after 3
# steps (lr 3e-3 / 1e-4); 1e-4 relative leaves room for other BLAS builds yet catches any real
# difference (a wrong batch, accumulation or clipping moves the third loss by >1e-2).
REL_TOL = 1e-4
WEIGHT_TOL = 1e-4

RECIPES = {
    # DPO's quickstart starts from the quickstart SFT run: the built-in model avoids the chain
    "sft": ["recipes/quickstart/sft.yaml"],
    "dpo": ["recipes/quickstart/dpo.yaml", "--set", "model.path=builtin:tiny-llama"],
}
COMMON = [f"train.max_steps={STEPS}", "train.logging_steps=1", "train.save_steps=2",
          "train.eval_before_train=false", "train.report_to=[none]", "data.eval=[]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(method: str, out: Path, *sets: str, resume: bool = False) -> list[str]:
    recipe, *extra = RECIPES[method]
    args = ["-m", "tunelab", "train", recipe, *extra]
    for s in (*COMMON, f"train.output_dir={out}", *sets):
        args += ["--set", s]
    return args + (["--resume", "auto"] if resume else [])


def _run(cmds: list[list[str]]) -> None:
    """Start the commands together (the nodes of one job) and wait for all; each must exit 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]


def _launch(method: str, out: Path, strategy: str, nodes: int = 1, resume: bool = False) -> Path:
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    port = _free_port()
    sets = ["train.batch_size=4", f"distributed.strategy={strategy}"]
    if nodes == 1:
        _run([[*torchrun, "--nproc-per-node", "2", "--master-port", str(port),
               *_args(method, out, *sets, resume=resume)]])
    else:  # 2 nodes x 1 process, static rendezvous on 127.0.0.1
        _run([[*torchrun, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
               "--master-addr", "127.0.0.1", "--master-port", str(port), *_args(method, out, *sets, resume=resume)]
              for rank in range(2)])
    return out


# (method, strategy, nodes): every strategy runs on one node for some method, each method as 2 nodes x 1
RUNS = [("sft", "ddp", 1), ("sft", "zero2", 2), ("sft", "zero3", 1),
        ("dpo", "ddp", 2), ("dpo", "zero2", 1), ("dpo", "zero3", 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Every run once: the single-process baselines (strategy none, micro batch 8) and the 2-process ones."""
    root = tmp_path_factory.mktemp("distributed")
    out = {}
    for method in RECIPES:
        single = root / f"{method}-single"
        _run([[sys.executable, *_args(method, single, "train.batch_size=8")]])
        out[(method, "single")] = single
    for method, strategy, nodes in RUNS:
        out[(method, strategy)] = _launch(method, root / f"{method}-{strategy}", strategy, nodes)
    return out


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "strategy", "nodes"), RUNS)
def test_loss_matches_single_process(runs, method, strategy, nodes):
    out = runs[(method, strategy)]
    summary = json.loads((out / "summary.json").read_text())
    expected = "MULTI_CPU" if strategy == "ddp" else "DEEPSPEED"
    assert (summary["processes"], summary["distributed"]) == (2, expected), summary
    single, multi = _losses(runs[(method, "single")]), _losses(out)
    assert len(single) == len(multi) == STEPS, (single, multi)  # one writer, every step
    assert multi == pytest.approx(single, rel=REL_TOL), (single, multi)
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method", list(RECIPES))
def test_zero3_final_holds_whole_weights(runs, method):
    """ZeRO-3 gathers its shards at save: final/ loads with stock transformers and equals the 1-process weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    z3 = runs[(method, "zero3")] / "final"
    AutoModelForCausalLM.from_pretrained(z3)  # whole HF weights, no DeepSpeed needed to read them
    got, want = load_file(z3 / "model.safetensors"), load_file(runs[(method, "single")] / "final" / "model.safetensors")
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape, name  # not a ZeRO-3 placeholder of shape [0]
        assert (got[name] - tensor).abs().max().item() < WEIGHT_TOL, name


def _cut_after_step_2(run: Path, to: Path) -> Path:
    """A copy of ``run`` as if it had been killed after writing checkpoint-2."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("final", "checkpoint-3", "summary.json"))
    assert (to / "checkpoint-2" / "trainer_state.json").is_file()
    return to


def _same_weights(run: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    got, want = load_file(run / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert set(want) <= set(got) <= set(want) | {"lm_head.weight"}  # ZeRO-1/2 also write the tied head out
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape and (got[name] - tensor).abs().max().item() < WEIGHT_TOL, name


@pytest.mark.slow
@pytest.mark.parametrize(("method", "strategy"), [("sft", "zero3"), ("dpo", "zero2")])
def test_resume_at_the_same_world_size(runs, tmp_path, method, strategy):
    """Killed after checkpoint-2, resumed with 2 processes: step 3 and final/ are those of the uncut run."""
    whole = runs[(method, strategy)]
    out = _launch(method, _cut_after_step_2(whole, tmp_path / "run"), strategy, resume=True)
    assert _losses(out) == pytest.approx(_losses(whole), rel=REL_TOL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("event") == "resumed"] == [2]  # resumed there, not started over
    assert [r["step"] for r in rows if "event" not in r][:3] == [1, 2, 3]
    _same_weights(out, whole)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "strategy"), [("sft", "zero2"), ("dpo", "zero3"), ("sft", "ddp")])
def test_resume_at_another_world_size(runs, tmp_path, method, strategy):
    """A 2-process checkpoint resumed by 1 process (micro batch 8: the same global batch).

    DeepSpeed refuses its ZeRO shards at another world size; tunelab converts the checkpoint to a
    universal one (whole fp32 weights and Adam moments per parameter) and the single process cuts
    its own shard from it. Step 3 must then be step 3 of the 2-process run, which the first test
    showed equals the single-process run: a wrongly cut optimizer state would move it. (A DDP
    checkpoint holds the whole optimizer state; it resumes as strategy none.)
    """
    whole = runs[(method, strategy)]
    out = _cut_after_step_2(whole, tmp_path / "run")
    single = "none" if strategy == "ddp" else strategy
    proc = subprocess.run([sys.executable, *_args(method, out, "train.batch_size=8", f"distributed.strategy={single}",
                                                  resume=True)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming from" in proc.stdout and "checkpoint-2" in proc.stdout
    converted = (out / "checkpoint-2" / "global_step2_universal").is_dir()
    assert converted == (strategy != "ddp")
    assert ("was written by 2 process(es), this run has 1" in proc.stdout) == converted, proc.stdout[-3000:]
    assert json.loads((out / "summary.json").read_text())["processes"] == 1
    assert _losses(out) == pytest.approx(_losses(whole), rel=REL_TOL)
    _same_weights(out, runs[(method, "single")])
