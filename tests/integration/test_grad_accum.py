"""Gradient accumulation through `tunelab train` (run_training in this process): micro batch 8 x 1 equals 4 x 2.

The two runs draw the same rows in the same order (one sampler seed, the same dataset length), so
the optimizer step of batch 8 and that of two accumulated micro batches of 4 see the same 8 rows.
They must take the same steps: the same logged loss and gradient norm at every step and the same
weights after 3 steps, in fp32, up to the order of floating-point sums (measured: weights agree to
<= 4e-7 absolute after moving by up to 0.6, losses and norms to ~1e-7 relative).

What this guards: SFT's rows have different numbers of trained tokens (padded rows of different
lengths, or packed rows of different fill), and tunelab's direct SFT loss divides the summed token
loss by the token count of the whole accumulated batch (``num_items_in_batch``). A per-micro-batch
mean (a mean of means) or a loss scaled twice for accumulation gives another gradient; DPO's
per-pair mean must be divided by the accumulation steps exactly once (the logged gradient norm
shows a wrong scale, which Adam and clipping would hide in the weights).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.models.builtin import builtin_model
from tunelab.train import run_training

COMMON = ["train.max_steps=3", "train.logging_steps=1", "train.save_steps=1000", "train.eval_before_train=false",
          "train.report_to=[none]", "data.eval=[]", "train.lr_scheduler=constant", "train.warmup_ratio=0.0",
          # plain SGD without clipping: each step moves the weights by exactly lr x the gradient, so the weights
          # compare the accumulated gradients themselves (Adam would hide a wrong scale, and its step turns the
          # rounding noise of near-zero gradients into lr-sized differences: measured 4e-5 at lr 3e-3)
          "train.optim=sgd", "train.max_grad_norm=0", "train.learning_rate=0.3"]
CASES = {
    # padded rows of 8 examples of different lengths
    "sft-padded": ("recipes/quickstart/sft.yaml", [
        'data.train=[{source: "builtin:quickstart/sft", format: messages, samples: 24}]', "data.packing=false"]),
    # ~28 packed rows of up to 128 tokens, each filled differently
    "sft-packed": ("recipes/quickstart/sft.yaml", [
        'data.train=[{source: "builtin:quickstart/sft", format: messages, samples: 64}]', "data.packing=true",
        "data.max_length=128"]),
    "dpo": ("recipes/quickstart/dpo.yaml", [
        "model.path=builtin:tiny-llama",
        'data.train=[{source: "builtin:quickstart/preference", format: preference, samples: 24}]']),
}


def _logged(run: Path) -> list[tuple[float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


@pytest.mark.parametrize("case", list(CASES))
def test_batch_8_equals_batch_4_accumulated_twice(case, tmp_path):
    recipe, extra = CASES[case]
    runs = {}
    for batch, accum in ((8, 1), (4, 2)):
        out = tmp_path / f"b{batch}x{accum}"
        run_training(recipe, [*COMMON, *extra, f"train.output_dir={out}", f"train.batch_size={batch}",
                              f"train.grad_accum={accum}"])
        runs[accum] = out
    whole, accumulated = _logged(runs[1]), _logged(runs[2])
    assert len(whole) == len(accumulated) == 3
    for step, ((loss_a, norm_a), (loss_b, norm_b)) in enumerate(zip(whole, accumulated), 1):
        assert loss_b == pytest.approx(loss_a, rel=1e-5), (step, whole, accumulated)
        assert norm_b == pytest.approx(norm_a, rel=1e-5), (step, whole, accumulated)
    a, b = load_file(runs[1] / "final" / "model.safetensors"), load_file(runs[2] / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    start = builtin_model("tiny-llama").state_dict()
    moved = max((a[name] - start[name]).abs().max().item() for name in a)
    assert moved > 1e-4, moved  # the steps moved the weights far beyond the tolerance (guard)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5, msg=name)
