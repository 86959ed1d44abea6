"""``tunelab plan``'s per-rank ZeRO shares (plan/memory.py) against what DeepSpeed really holds on each of 2 ranks.

Two processes (torchrun, gloo) each build ``builtin:tiny-llama``, hand it and torch's AdamW (train.optim
adamw_torch, as the HF Trainer does) to ``deepspeed.initialize`` with the JSON tunelab generates for the
recipe (``deepspeed_config``), run one forward, backward and optimizer step, and read the sizes off
DeepSpeed's own objects:

- weights: every parameter's storage; under ZeRO-3 the rank's partition (``param.ds_tensor``);
- gradients (ZeRO-2: ``averaged_gradients``, ZeRO-3: ``grad_partitions_flat_buffer``), right after backward;
- optimizer: the inner optimizer's state tensors (exp_avg, exp_avg_sq) plus the fp32 master copy it steps
  (ZeRO-1/2 ``single_partition_of_fp32_groups``, ZeRO-3 ``fp32_partitioned_groups_flat``, zero0 under bf16
  ``fp32_groups``), each checked to be a storage of its own, not a view of the parameters.

ZeRO-0..3 in fp32 and bf16 run in one launch (~10 s). (ZeRO-1's gradients are not compared: DeepSpeed
holds them whole until the reduce at the accumulation boundary and frees them after it, the peak the
plan counts.) Found with it: ZeRO-1..3 keep an fp32 master partition of fp32 parameters too, which the
plan did not count (8 instead of 12 bytes of optimizer per parameter).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
RECIPE = REPO / "recipes/quickstart/sft.yaml"
GPUS = 2
STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16")
# DeepSpeed pads each rank's partition to an alignment; on the tiny model (590,464 parameters, even) it is exact
REL_TOL = 0.01


def overrides(stage: int, precision: str) -> list[str]:
    return [f"distributed.strategy=zero{stage}", "model.dtype=float32", f"train.precision={precision}",
            "train.batch_size=2"]


def _bytes(t) -> int:  # noqa: ANN001
    return t.numel() * t.element_size()


def measure_rank(out: Path) -> None:
    """Run under torchrun: one engine per (precision, stage), the sizes this rank holds written to out/rankN.json."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from tunelab.distributed.config import deepspeed_config
    from tunelab.models.builtin import builtin_model
    from tunelab.recipe.load import load_recipe

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, dict] = {}
    for precision in PRECISIONS:
        for stage in STAGES:
            recipe = load_recipe(RECIPE, overrides(stage, precision)).recipe
            model = builtin_model("tiny-llama", dtype=torch.float32)
            engine, zopt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                                      config=deepspeed_config(recipe, world))
            ids = torch.randint(3, 1400, (2, 32), generator=torch.Generator().manual_seed(rank))
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            params = list(engine.module.parameters())
            got: dict = {"optimizer_class": type(zopt).__name__, "dtype": str(params[0].dtype)}
            if stage == 2:
                got["grads"] = sum(_bytes(t) for ts in zopt.averaged_gradients.values() for t in ts)
            elif stage == 3:
                got["grads"] = _bytes(zopt.grad_partitions_flat_buffer)
            engine.step()
            held = [p.ds_tensor if stage == 3 else p for p in params]
            got["weights"] = sum(_bytes(t) for t in held)
            inner = zopt.optimizer if stage >= 1 else zopt
            states = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
            if stage == 3:
                master = list(zopt.fp32_partitioned_groups_flat)
            elif stage >= 1:
                master = list(zopt.single_partition_of_fp32_groups)
            else:  # zero0: torch's AdamW itself in fp32; DeepSpeed's 16-bit wrapper keeps fp32 groups
                master = [t for group in getattr(zopt, "fp32_groups", []) for t in group]
            param_storages = {t.untyped_storage().data_ptr() for t in held}
            got["master_is_a_copy"] = all(t.untyped_storage().data_ptr() not in param_storages for t in master)
            got["optimizer"] = sum(_bytes(t) for t in states) + sum(_bytes(t) for t in master)
            got["master"] = sum(_bytes(t) for t in master)
            results[f"{precision}-zero{stage}"] = got
            del engine, zopt, model
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> list[dict]:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("zero-shares")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(GPUS),
                           "--master-port", str(port), __file__, str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(GPUS)]


@pytest.mark.slow  # the 2-process launch: ~10 s, once for the module
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("stage", STAGES)
def test_plan_shares_equal_what_deepspeed_holds_per_rank(measured, stage, precision):
    from tunelab.plan import estimate, parse_memory
    from tunelab.recipe.load import load_recipe

    recipe = load_recipe(RECIPE, overrides(stage, precision)).recipe
    plan = {e.strategy: e for e in estimate(recipe, gpus=GPUS, gpu_memory=parse_memory("80GB"), gpu=False).estimates}
    est = plan[f"zero{stage}"]
    key = f"{precision}-zero{stage}"
    for rank, m in enumerate(measured):
        m = m[key]
        assert m["dtype"] == ("torch.bfloat16" if precision == "bf16" else "torch.float32")
        assert m["master_is_a_copy"], (rank, m)
        parts = ["weights", "optimizer"] + (["grads"] if stage >= 2 else [])
        bad = [f"rank {rank} {part}: plan {getattr(est, part):.0f} B, DeepSpeed {m[part]} B"
               for part in parts if getattr(est, part) != pytest.approx(m[part], rel=REL_TOL)]
        assert not bad, "\n".join(bad) + f"\n{m}"
    # the sharding is real: each ZeRO stage holds less of its part than zero0 does on the same rank
    zero0 = measured[0][f"{precision}-zero0"]
    m = measured[0][key]
    if stage >= 1:
        assert m["optimizer"] == pytest.approx(zero0["optimizer"] / GPUS * (1.5 if precision == "fp32" else 1),
                                               rel=REL_TOL)
    if stage == 3:
        assert m["weights"] == pytest.approx(zero0["weights"] / GPUS, rel=REL_TOL)


if __name__ == "__main__":  # a rank of the launch above
    measure_rank(Path(sys.argv[1]))
