"""What only a GPU can check (marker ``gpu``; tests/conftest.py skips all of it without CUDA).

- bf16 SFT and DPO steps on the built-in tiny model finish with finite losses;
- flash-attention's padding-free packing (TRL's collator: one concatenated row, position ids restarting at
  every example, the varlen boundaries): each packed example's logits equal those of the example alone,
  and a 2-step SFT run on flash_attention_2 with packing trains;
- FSDP2 over 2 processes (2 GPUs or more) through ``tunelab launch``, 2 steps, a consolidated ``final/``
  that plain transformers loads;
- QLoRA (bitsandbytes 4-bit) on CUDA trains 2 steps with a finite adapter;
- Liger kernels (``method.trl: {use_liger_kernel: true}``, TRL applies the layer kernels) give the same
  losses as without.

``scripts/gpu_checks.sh`` runs them in one call. Each run is 2 optimizer steps of the tiny model.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

COMMON = ["train.max_steps=2", "train.logging_steps=1", "train.eval_before_train=false", "train.report_to=[none]",
          "train.save_steps=1000"]


def sets(*extra: str) -> list[str]:
    return [a for s in (*COMMON, *extra) for a in ("--set", s)]


def losses(out: Path) -> list[float]:
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in metrics if "loss" in m]


def one_gpu() -> dict[str, str]:
    """The environment of a single-process run: one GPU visible (the first one already visible).

    With several GPUs visible to one process the HF Trainer wraps the model in nn.DataParallel, which TRL's
    trainers refuse; several GPUs are for ``tunelab launch`` (test_fsdp2_two_processes_save_whole_weights).
    """
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    return {"CUDA_VISIBLE_DEVICES": visible}


def train(run_cli, recipe: str, out: Path, *extra: str) -> list[float]:
    rc, stdout, stderr = run_cli("train", recipe, *sets(f"train.output_dir={out}", *extra), env=one_gpu())
    assert rc == 0, (stdout + stderr)[-4000:]
    got = losses(out)
    assert len(got) >= 2 and all(math.isfinite(x) for x in got), got
    return got


def needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install tunelab[gpu])")


# ------------------------------------------------------------------------------------------- bf16


@pytest.mark.parametrize(("recipe", "extra"), [
    ("recipes/quickstart/sft.yaml", []),
    ("recipes/quickstart/sft.yaml", ["model.dtype=bfloat16"]),  # bf16 weights, not only bf16 autocast
    ("recipes/quickstart/dpo.yaml", ["model.path=builtin:tiny-llama"]),
], ids=["sft-autocast", "sft-bf16-weights", "dpo"])
def test_bf16_steps_have_finite_loss(run_cli, tmp_path, recipe, extra):
    import torch

    assert torch.cuda.is_bf16_supported()
    out = tmp_path / "run"
    train(run_cli, recipe, out, "train.precision=bf16", *extra)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 1 and summary["global_step"] == 2
    assert (out / "final" / "config.json").is_file()


# --------------------------------------------------------------------------- flash-attention packing


def test_flash_attention_packed_examples_equal_each_example_alone():
    """TRL's padding-free batch (what SFTTrainer collates when the model has varlen kernels) through
    flash_attention_2: no example sees another, so its logits are those of the example run by itself."""
    needs("flash_attn")
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tunelab.data.collate import uses_varlen_attention
    from tunelab.models.builtin import builtin_model

    model = builtin_model("tiny-llama", dtype=torch.bfloat16, attn_implementation="flash_attention_2").cuda().eval()
    assert uses_varlen_attention(model)  # so tunelab's SFT keeps TRL's padding-free collator (methods/sft.py)
    gen = torch.Generator().manual_seed(0)
    examples = [torch.randint(3, 1400, (n,), generator=gen).tolist() for n in (37, 5, 80, 21)]
    row = {"input_ids": [t for e in examples for t in e], "seq_lengths": [len(e) for e in examples]}
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([row])
    assert batch["input_ids"].shape == (1, sum(len(e) for e in examples)) and "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == [p for e in examples for p in range(len(e))]
    inputs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits[0].float()
        # the same row without the example boundaries: later examples attend to earlier ones and differ
        unpacked = model(input_ids=inputs["input_ids"], use_cache=False).logits[0].float()
        start = 0
        for i, e in enumerate(examples):
            alone = model(input_ids=torch.tensor([e], device="cuda"), use_cache=False).logits[0].float()
            torch.testing.assert_close(packed[start : start + len(e)], alone, atol=3e-2, rtol=3e-2,
                                       msg=lambda m, i=i: f"example {i}: {m}")
            if i > 0:
                assert (unpacked[start : start + len(e)] - alone).abs().max() > 0.1  # the check can fail
            start += len(e)


def test_flash_attention_sft_with_packing_trains(run_cli, tmp_path):
    needs("flash_attn")
    train(run_cli, "recipes/quickstart/sft.yaml", tmp_path / "run", "model.attn_implementation=flash_attention_2",
          "data.packing=true", "train.precision=bf16", "model.dtype=bfloat16")


# ------------------------------------------------------------------------------------------- FSDP2


def test_fsdp2_two_processes_save_whole_weights(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip(f"FSDP2 over 2 processes needs 2 GPUs, {torch.cuda.device_count()} here")
    from transformers import AutoModelForCausalLM

    from tunelab.models.builtin import builtin_model

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "fsdp2"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "tunelab"
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "tunelab"]), "launch",
           "recipes/quickstart/sft.yaml", "--nproc-per-node", "2", "--master-port", str(port),
           *sets(f"train.output_dir={out}", "distributed.strategy=fsdp2", "train.precision=bf16")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["distributed"] == "FSDP", summary
    assert all(math.isfinite(x) for x in losses(out))
    saved = AutoModelForCausalLM.from_pretrained(out / "final")  # whole tensors, plain transformers
    shapes = {n: tuple(p.shape) for n, p in builtin_model("tiny-llama").named_parameters()}
    got = {n: tuple(p.shape) for n, p in saved.named_parameters()}
    assert got == shapes  # not flat shards
    assert all(torch.isfinite(p).all() for p in saved.parameters())


# ------------------------------------------------------------------------------------------- QLoRA


def test_qlora_on_cuda_trains_with_a_finite_adapter(run_cli, tmp_path):
    needs("bitsandbytes")
    import bitsandbytes as bnb
    import torch
    from safetensors.torch import load_file

    from tunelab.models.load import load_model
    from tunelab.models.peft import quantization_of
    from tunelab.recipe.load import load_recipe

    recipe_sets = ["peft.quantization.compute_dtype=bfloat16", "train.precision=bf16"]
    # what training loads: the frozen linears are bitsandbytes 4-bit layers, and they compute on the GPU
    recipe = load_recipe("recipes/quickstart/sft-qlora.yaml", recipe_sets).recipe
    model = load_model(recipe.model, quantization_of(recipe), full_finetune=False).cuda()
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.device.type == "cuda" for m in quantized)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 13]], device="cuda")).logits
    assert torch.isfinite(logits).all()
    del model

    out = tmp_path / "qlora"
    train(run_cli, "recipes/quickstart/sft-qlora.yaml", out, *recipe_sets)
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in adapter.items())  # B starts at zero: it trained


# ------------------------------------------------------------------------------------------- Liger


def liger_applied(module) -> bool:  # noqa: ANN001
    """Whether liger patched an RMSNorm instance (it rebinds forward on the instance, or swaps in its class)."""
    return "forward" in vars(module) or type(module).__name__.startswith("Liger")


def test_liger_kernels_give_the_same_losses(run_cli, tmp_path):
    """The recipe turns Liger on through the TRL pass-through (there is no tunelab key for it); TRL then applies
    the layer kernels (RMSNorm, SwiGLU, RoPE), not the fused cross-entropy. fp32, same seed and data: the
    losses of the 2 steps agree with the plain run's to 1e-3 (kernel reduction order only)."""
    needs("liger_kernel")
    from transformers.integrations.liger import apply_liger_kernel

    from tunelab.models.builtin import builtin_model

    model = builtin_model("tiny-llama")
    apply_liger_kernel(model, {"fused_linear_cross_entropy": False})  # what the Trainer does with the flag
    assert liger_applied(model.model.norm), "liger did not patch the tiny Llama: the comparison would be vacuous"

    fp32 = ["train.precision=fp32", "model.dtype=float32"]
    plain = train(run_cli, "recipes/quickstart/sft.yaml", tmp_path / "plain", *fp32)
    liger = train(run_cli, "recipes/quickstart/sft.yaml", tmp_path / "liger", *fp32,
                  "method.trl={use_liger_kernel: true}")
    assert liger == pytest.approx(plain, rel=1e-3), (plain, liger)
