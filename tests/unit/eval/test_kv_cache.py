"""`tunelab eval --task kv-cache` (eval/kv_cache.py): the measured cache against the geometry, for MLA and stock
models."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.models.builtin import builtin_config


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
