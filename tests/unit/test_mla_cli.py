"""MLA through the user's doors: `tunelab convert mla`, `eval --task kv-cache`, `export deepseek`, the recipe
patch's calibration tokens, converted directories loading everywhere, and training with and from MLA."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.data.sources import BUILTIN_DATA
from tunelab.errors import UserError
from tunelab.models.builtin import builtin_config, builtin_tokenizer
from tunelab.patches.mla.attention import MLAAttention

CFG = builtin_config("tiny-llama")
LAYERS, N_KV, HEAD_DIM = CFG.num_hidden_layers, CFG.num_key_value_heads, CFG.hidden_size // CFG.num_attention_heads
FP32 = 4


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


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """builtin:tiny-llama converted by the CLI: R = 32, 8 RoPE dims per KV head (partial_rope high)."""
    out = tmp_path_factory.mktemp("mla") / "tiny-llama-mla"
    convert(out)
    return out


# ---------------------------------------------------------------- convert + kv-cache


def test_convert_saves_a_loadable_model_and_prints_the_saving(converted):
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (converted / name).is_file(), name
    mla = json.loads((converted / "config.json").read_text())["mla"]
    assert (mla["kv_lora_rank"], mla["rope_dim"], mla["partial_rope"], mla["rope_key"]) == (32, 8, "high", "per-head")


@pytest.mark.parametrize("rope_key, rope_values", [("per-head", N_KV * 8), ("shared", 8)])
def test_kv_cache_eval_measures_what_the_geometry_predicts(tmp_path, converted, rope_key, rope_values):
    model = converted
    if rope_key == "shared":
        model = tmp_path / "shared"
        convert(model, "--rope-key", "shared", "--latent-norm")
    rc, output = cli("eval", model, "--task", "kv-cache", "--lengths", "16,40", "-o", tmp_path / "kv")
    assert rc == 0, output
    report = json.loads((tmp_path / "kv" / "kv_cache.json").read_text())
    per_token = LAYERS * (32 + rope_values) * FP32
    assert report["original_bytes_per_token"] == 2 * LAYERS * N_KV * HEAD_DIM * FP32
    assert report["bytes_per_token"] == per_token
    assert [m["tokens"] for m in report["measured"]] == [16, 40]
    for m in report["measured"]:
        assert m["cache"] == "MLACache"
        assert m["bytes"] == per_token * m["tokens"] and m["matches"]
    assert f"{100 * (1 - per_token / report['original_bytes_per_token']):.1f}% smaller" in output


def test_kv_cache_eval_of_a_stock_model_reports_its_full_kv(tmp_path):
    rc, output = cli("eval", "builtin:tiny-llama", "--task", "kv-cache", "--lengths", "12", "-o", tmp_path)
    assert rc == 0, output
    report = json.loads((tmp_path / "kv_cache.json").read_text())
    (m,) = report["measured"]
    assert report["mla"] is None and m["cache"] == "DynamicCache"
    assert m["bytes"] == 2 * LAYERS * N_KV * HEAD_DIM * FP32 * 12 and m["matches"]
    rc, output = cli("eval", "builtin:tiny-llama", "--task", "kv-cache", "--data", "builtin:quickstart/text")
    assert rc == 2 and "--data: --task kv-cache does not read data" in output


def test_convert_refuses_bad_options_before_loading_weights(tmp_path, monkeypatch):
    import tunelab.convert

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(tunelab.convert, "_load_model", no_weights)
    rc, output = cli("convert", "mla", "builtin:tiny-llama", "-o", tmp_path / "a", "--kv-lora-rank", 0,
                     "--rope-dim", 7, "--partial-rope", "2-norm", "--svd", "qr")
    assert rc == 2
    for text in ("--kv-lora-rank: ", "--rope-dim: rope_dim 7 is odd", "--svd: ", "'qr'",
                 "--calibration-data: --partial-rope 2-norm ranks", "give --calibration-data"):
        assert text in output, output
    rc, output = cli("convert", "mla", "builtin:tiny-llama", "-o", tmp_path / "b", "--kv-lora-rank", 300,
                     "--rope-dim", 34)
    assert rc == 2 and "--kv-lora-rank: 300 is larger than 2 x num_key_value_heads x head_dim" in output
    assert "--rope-dim: 34 is larger than the model's head_dim 32" in output
    rc, output = cli("convert", "mla", "builtin:tiny-llama", "-o", tmp_path / "c", "--kv-lora-rank", 8,
                     "--rope-dim", 4, "--calibration-data", "builtin:quickstart/sft_eval", "--calibration-samples", 100)
    assert rc == 2 and "--calibration-data: builtin:quickstart/sft_eval gives" in output
    assert "lower --calibration-samples or --calibration-length" in output


def test_convert_refuses_a_converted_model_and_a_used_output(tmp_path, converted):
    rc, output = cli("convert", "mla", converted, "-o", tmp_path / "again", "--kv-lora-rank", 8, "--rope-dim", 4)
    assert rc == 2 and "already converted to MLA" in output
    rc, output = cli("convert", "mla", "builtin:tiny-llama", "-o", converted, "--kv-lora-rank", 8, "--rope-dim", 4)
    assert rc == 2 and "--output: " in output and "not an empty folder" in output


# ---------------------------------------------------------------- export deepseek


def test_export_deepseek(tmp_path, converted):
    source = tmp_path / "shared"
    convert(source, "--rope-key", "shared", "--latent-norm")
    rc, output = cli("export", "deepseek", source, "-o", tmp_path / "ds")
    assert rc == 0, output
    assert json.loads((tmp_path / "ds" / "config.json").read_text())["model_type"] == "deepseek_v3"
    rc, output = cli("export", "deepseek", converted, "-o", tmp_path / "ds2")  # per-head RoPE keys: refused
    assert rc == 2 and "error: MODEL: cannot export to DeepSeek-V3" in output
    rc, output = cli("export", "deepseek", "builtin:tiny-llama", "-o", tmp_path / "ds3")
    assert rc == 2 and "not an MLA-converted model" in output and "tunelab convert mla" in output
    rc, output = cli("export", "deepseek", source, "-o", tmp_path / "ds4", "--rope-layout", "zigzag")
    assert rc == 2 and "--rope-layout" in output


# ---------------------------------------------------------------- calibration tokens


def test_calibration_tokens_render_conversations_through_the_chat_template():
    from tunelab.patches.mla.block import MlaPatch
    from tunelab.patches.mla.calibration import calibration_token_ids

    tok = builtin_tokenizer()
    spec = MlaPatch(name="mla", kv_lora_rank=8, rope_dim=4, partial_rope="2-norm",
                    calibration_data="builtin:quickstart/sft", calibration_samples=3, calibration_length=50)
    rows = calibration_token_ids(spec, tok)
    assert [len(r) for r in rows] == [50, 50, 50]
    first = json.loads((BUILTIN_DATA / "quickstart/sft.jsonl").read_text().splitlines()[0])
    rendered = tok.apply_chat_template(first["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert rows[0] == list(rendered[:50])
    text = spec.model_copy(update={"calibration_data": "builtin:quickstart/text"})
    first_text = json.loads((BUILTIN_DATA / "quickstart/text.jsonl").read_text().splitlines()[0])["text"]
    assert calibration_token_ids(text, tok)[0] == tok(first_text, add_special_tokens=False)["input_ids"][:50]
    with pytest.raises(UserError, match="calibration_samples x calibration_length"):
        calibration_token_ids(spec.model_copy(update={"calibration_samples": 10_000}), tok)


# ---------------------------------------------------------------- loading converted directories


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


# ---------------------------------------------------------------- training with and from MLA

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


def test_train_with_the_mla_patch_saves_a_final_that_reloads(tmp_path, run_cli):
    from tunelab.eval.commands import run_eval

    out = tmp_path / "run"
    recipe = tmp_path / "mla.yaml"
    recipe.write_text(RECIPE.format(path="builtin:tiny-llama", out=out, extra=textwrap.dedent("""\
        patches:
          - {name: mla, kv_lora_rank: 32, rope_dim: 8, partial_rope: 2-norm,
             calibration_data: "builtin:quickstart/text", calibration_samples: 4, calibration_length: 64}""")))
    rc, stdout, stderr = run_cli("train", recipe)
    assert rc == 0, stderr[-3000:]
    assert "patch name mla, kv_lora_rank 32, rope_dim 8, partial_rope 2-norm" in stdout
    assert "kv_cache_bytes_per_token_before 1024, kv_cache_bytes_per_token_after 384" in stdout
    assert json.loads((out / "final" / "config.json").read_text())["mla"]["kv_lora_rank"] == 32
    lock = (out / "recipe.lock.yaml").read_text()
    assert "split: patches[0]" in lock  # the calibration data is fingerprinted
    # the reloaded final/ scores the eval set exactly as the trained model did at the end of training
    after = json.loads((out / "summary.json").read_text())["eval_after"]["perplexity"]
    again = run_eval(str(out), "builtin:quickstart/sft_eval", "messages", 256, 8, None, None, 0)
    assert again["perplexity"] == pytest.approx(after, rel=1e-5)


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
