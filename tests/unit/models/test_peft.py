"""PEFT (models/peft.py): a fresh LoRA changes nothing, the scaling is alpha / r, LoRA on an MLA-converted model
trains and reloads, and training any PEFT method moves its adapter only, with finite losses."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.models.builtin import builtin_model, builtin_tokenizer
from tunelab.models.peft import apply_peft
from tunelab.patches.mla.attention import MLAAttention
from tunelab.specs import LoraSpec
from tunelab.methods.base import RunHooks

IDS = torch.tensor([[1, 100, 200, 300, 400, 2, 17, 99]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fresh_adapter_changes_no_logit(method):
    base = builtin_model("tiny-llama").eval()
    before = logits(base)
    model = apply_peft(builtin_model("tiny-llama"), LoraSpec(method=method, r=8, alpha=16, dropout=0.0),
                       builtin_tokenizer()).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert torch.count_nonzero(p) == 0, name  # B starts at zero
    torch.testing.assert_close(logits(model), before, atol=1e-6, rtol=0)


def test_lora_scaling_is_alpha_over_r():
    """One LoRA linear by hand: y = W x + (B A x) * alpha / r (alpha / sqrt(r) with rsLoRA)."""
    for rslora in (False, True):
        model = apply_peft(builtin_model("tiny-llama"), LoraSpec(method="lora", r=4, alpha=12, dropout=0.0,
                                                                  use_rslora=rslora, target_modules=["q_proj"]),
                           builtin_tokenizer()).eval()
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        torch.manual_seed(0)
        layer.lora_B["default"].weight.data.normal_()
        x = torch.randn(3, layer.in_features)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        scale = 12 / (4 ** 0.5 if rslora else 4)
        want = x @ layer.base_layer.weight.T + (x @ a.T @ b.T) * scale
        with torch.no_grad():
            torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def cli(*args: object) -> tuple[int, str]:
    """Run the CLI in this process: (exit code, stdout + stderr)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def convert(out, *extra: object, rank: int = 32, rope: int = 8) -> None:
    rc, output = cli("convert", "mla", "builtin:tiny-llama", "-o", out, "--kv-lora-rank", rank, "--rope-dim", rope,
                     *extra)
    assert rc == 0, output


RECIPE = """\
model: {{path: "{path}"}}
{extra}
data:
  train: [{{source: "builtin:quickstart/sft", format: messages}}]
  eval: [{{source: "builtin:quickstart/sft_eval", format: messages}}]
  max_length: 256
method: {{name: sft}}
train: {{output_dir: "{out}", max_steps: 2, learning_rate: 1.0e-3, batch_size: 2, logging_steps: 1,
        save_steps: 100}}
"""


def test_lora_on_a_converted_dir_trains_and_reloads(tmp_path, converted, run_cli):
    from tunelab.models.inference import load_for_inference

    out = tmp_path / "heal"
    recipe = tmp_path / "heal.yaml"
    recipe.write_text(RECIPE.format(path=converted, out=out,
                                    extra="peft: {method: lora, r: 4, alpha: 8, target_modules: all-linear}"))
    rc, _, stderr = run_cli("train", recipe)
    assert rc == 0, stderr[-3000:]
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(converted)
    targets = {t.rsplit(".", 1)[-1] for t in adapter["target_modules"]}
    assert {"q_proj", "kv_down_proj", "k_up_proj", "v_up_proj", "k_rope_proj", "o_proj"} <= targets
    model, _ = load_for_inference(str(out))
    base = model.get_base_model()
    assert isinstance(base.model.layers[0].self_attn, MLAAttention)
    trained = [p for n, p in model.named_parameters() if "lora_B" in n and "kv_down_proj" in n]
    assert trained and all(p.abs().sum() > 0 for p in trained)  # B starts at zero: these were trained
    from tunelab.errors import RecipeError
    from tunelab.recipe.validate import validate

    with pytest.raises(RecipeError, match="peft.method: .* is an MLA model, which tunelab loads unquantized"):
        validate(recipe, ["peft.method=qlora"])


ADAPTER_MARKERS = ("lora_", "prompt_encoder")  # LoRA/DoRA A, B and magnitude; prefix and prompt embeddings


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "prefix", "prompt"])
def test_training_moves_the_adapter_only(method, tmp_path):
    """Two SFT steps on the quickstart recipe of each PEFT method, built the way `tunelab train` builds them
    (validate, prepare_data, prepare_model, the method's trainer): every adapter tensor changed, every other
    tensor of the state dict (base weights, 4-bit blocks and their quantization state, buffers) is bit-equal to its
    value before training, and each logged loss and gradient norm is finite (a NaN or inf loss fails)."""
    import math

    from transformers import set_seed

    from tunelab.models.load import load_tokenizer
    from tunelab.recipe.validate import validate
    from tunelab.runs import RunDir
    from tunelab.train import prepare_data, prepare_model

    resolved = validate(f"recipes/quickstart/sft-{method}.yaml", [
        f"train.output_dir={tmp_path}", "train.report_to=[none]", "train.max_steps=2", "train.batch_size=4",
        "train.logging_steps=1", "train.save_steps=1000", "train.warmup_ratio=0.0", "data.eval=[]",
        'data.train=[{source: "builtin:quickstart/sft", format: messages, samples: 16}]'])
    run = RunDir(tmp_path)
    set_seed(resolved.recipe.train.seed)
    tokenizer = load_tokenizer(resolved.recipe.model)
    train_ds, _, _, _ = prepare_data(resolved, run, tokenizer)
    model = prepare_model(resolved, run, tokenizer)
    if method == "qlora":
        assert getattr(model.get_base_model(), "is_loaded_in_4bit", False)  # a 4-bit base, on this CPU
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    adapter = {k for k in before if any(m in k for m in ADAPTER_MARKERS)}
    assert adapter and len(adapter) < len(before)
    trainer = resolved.method.build_trainer(resolved.recipe, model, tokenizer, train_ds, None, RunHooks())
    trainer.train()

    after = model.state_dict()
    assert after.keys() == before.keys()
    unchanged = sorted(k for k in adapter if torch.equal(after[k], before[k]))
    assert not unchanged, f"adapter tensors that did not train: {unchanged}"
    assert all(torch.isfinite(after[k]).all() for k in adapter)  # changed, to numbers
    moved = sorted(k for k in before.keys() - adapter if not torch.equal(after[k], before[k]))
    assert not moved, f"base tensors that changed: {moved}"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(m in n for m in ADAPTER_MARKERS) for n in trainable), trainable
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 2
    # (transformers logs a NaN/inf loss as the mean of the earlier ones, 0.0 at first: the gradient norm shows it)
    for row in logged:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]), row
