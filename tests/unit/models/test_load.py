"""Model loading (models/load.py): stop tokens, a 4-bit QLoRA base, MLA-converted directories, a missing starting run
named before anything loads."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.data.templates import ChatTemplateChoice, apply_choice
from tunelab.errors import UserError
from tunelab.models.builtin import builtin_model, builtin_tokenizer
from tunelab.patches.mla.attention import MLAAttention


IDS = torch.tensor([[1, 100, 200, 300, 400, 2, 17, 99]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


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


def test_stop_tokens_include_the_templates_end_of_turn_when_eos_differs():
    from tunelab.models.builtin import builtin_model
    from tunelab.models.load import set_stop_tokens

    tok = builtin_tokenizer()
    tok.eos_token = "<|endoftext|>"  # a tokenizer whose eos is the document end, not the end of a turn
    apply_choice(tok, ChatTemplateChoice("chatml", tok.chat_template, "marked", "<|im_end|>"))
    model = builtin_model("tiny-llama")
    model.generation_config.eos_token_id = tok.eos_token_id
    ids = set_stop_tokens(model, tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in ids and tok.eos_token_id in ids
    assert set(model.generation_config.eos_token_id) == {im_end, tok.eos_token_id}


def test_qlora_base_is_really_4bit():
    import bitsandbytes as bnb

    from tunelab.models.load import load_model
    from tunelab.specs import ModelSpec, QuantizationSpec

    model = load_model(ModelSpec(path="builtin:tiny-llama"), QuantizationSpec(compute_dtype="float32"),
                       full_finetune=False)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q k v o gate up down in each of the 2 layers
    assert layers[0].weight.quant_type == "nf4"
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    ref = logits(builtin_model("tiny-llama").eval())
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.5  # close to the fp32 model, but quantized (not identical)
    assert (out - ref).abs().max() > 0


def test_models_load_reads_a_converted_dir_in_the_asked_dtype(converted):
    from tunelab.models.inference import load_for_inference
    from tunelab.models.load import load_model
    from tunelab.patches.mla.convert import load_mla_model
    from tunelab.specs import ModelSpec, QuantizationSpec

    reference = load_mla_model(converted)
    model = load_model(ModelSpec(path=str(converted), dtype="float32"))
    assert all(isinstance(layer.self_attn, MLAAttention) for layer in model.model.layers)
    assert model.name_or_path == str(converted)  # what a PEFT adapter records as its base
    ids = torch.randint(3, 1400, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=0, rtol=0)
    half = load_model(ModelSpec(path=str(converted), dtype="bfloat16"))
    assert next(half.parameters()).dtype == torch.bfloat16
    assert isinstance(load_for_inference(str(converted))[0].model.layers[0].self_attn, MLAAttention)
    with pytest.raises(UserError, match="model.quantization"):
        load_model(ModelSpec(path=str(converted)), quantization=QuantizationSpec())
    with pytest.raises(UserError, match="causal LM only"):
        load_model(ModelSpec(path=str(converted)), head="score")
    with pytest.raises(UserError, match="eager or sdpa"):
        load_model(ModelSpec(path=str(converted), attn_implementation="flash_attention_2"))


def test_missing_starting_run_is_named_before_loading(tmp_path, run_cli):
    rc, out, err = run_cli("train", "recipes/quickstart/dpo.yaml", "--set", f"model.path={tmp_path}/sft/final",
                           "--set", f"train.output_dir={tmp_path}/dpo")
    assert rc == 2 and "model.path:" in err and "does not exist" in err and "train the run" in err
    assert not (tmp_path / "dpo").exists()  # stopped before the run directory or any weights
