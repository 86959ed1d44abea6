"""PEFT (models/peft.py): a fresh LoRA changes nothing, the scaling is alpha / r, LoRA on an MLA-converted model
trains and reloads."""

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
