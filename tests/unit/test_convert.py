"""`tunelab convert mla` and `tunelab export deepseek` (tunelab/convert.py) through the CLI: what they save, what
they refuse before any weights load."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tunelab.cli import app


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


def test_convert_saves_a_loadable_model_and_prints_the_saving(converted):
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (converted / name).is_file(), name
    mla = json.loads((converted / "config.json").read_text())["mla"]
    assert (mla["kv_lora_rank"], mla["rope_dim"], mla["partial_rope"], mla["rope_key"]) == (32, 8, "high", "per-head")


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
