"""The MLA quickstart on CPU, end to end through the CLI: a trained tiny model converted at a low rank
loses perplexity, a short healing fine-tune recovers most of it, the cache is as small as
predicted, and the DeepSeek-form model exports to a checkpoint stock transformers reads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EVAL = ["--task", "ppl-vs-length", "--data", "builtin:long-context/long_eval", "--lengths", "128"]


def _ppl(run_cli, model: Path, out: Path) -> float:
    rc, _, stderr = run_cli("eval", str(model), *EVAL, "--output", str(out))
    assert rc == 0, stderr[-3000:]
    return json.loads((out / "ppl_vs_length.json").read_text())["results"][0]["ppl"]


@pytest.mark.slow
def test_mla_conversion_heals_and_caches_only_the_latent(run_cli, tmp_path, long_context_base):
    base = long_context_base / "final"
    converted, healed = tmp_path / "converted", tmp_path / "healed"
    # the conversion of recipes/mla/heal.yaml, on its own through the CLI
    rc, stdout, err = run_cli("convert", "mla", str(base), "-o", str(converted), "--kv-lora-rank", "16",
                              "--rope-dim", "8", "--partial-rope", "2-norm",
                              "--calibration-data", "builtin:long-context/short")
    assert rc == 0, err[-3000:]
    before = _ppl(run_cli, base, tmp_path / "eval-base")
    after_conversion = _ppl(run_cli, converted, tmp_path / "eval-converted")
    assert after_conversion > 1.3 * before, (before, after_conversion)  # measured 1.665 -> 3.231

    # healing: the recipe converts at load time (the same conversion), then fine-tunes one epoch
    rc, stdout, err = run_cli("train", "recipes/mla/heal.yaml", "--set", f"model.path={base}",
                              "--set", f"train.output_dir={healed}", "--set", "train.epochs=1",
                              "--set", "train.report_to=[none]")
    assert rc == 0, err[-3000:]
    after_healing = _ppl(run_cli, healed, tmp_path / "eval-healed")
    recovered = (after_conversion - after_healing) / (after_conversion - before)
    assert recovered >= 0.75, (before, after_conversion, after_healing)  # "most of the gap" (measured ~100%)

    rc, _, err = run_cli("eval", str(healed), "--task", "kv-cache", "--lengths", "32,96",
                         "--output", str(tmp_path / "eval-kv"))
    assert rc == 0, err[-3000:]
    report = json.loads((tmp_path / "eval-kv" / "kv_cache.json").read_text())
    assert report["original_bytes_per_token"] == 2 * 2 * 2 * 32 * 4  # layers x (K+V) x KV heads x head_dim x fp32
    assert report["bytes_per_token"] == 2 * (16 + 2 * 8) * 4  # layers x (latent + RoPE keys) x fp32
    assert [m["bytes"] for m in report["measured"]] == [32 * 256, 96 * 256]


@pytest.mark.slow
def test_deepseek_form_heals_and_exports_to_stock_transformers(run_cli, tmp_path, long_context_base):
    base = long_context_base / "final"
    healed, exported = tmp_path / "healed", tmp_path / "deepseek"
    rc, _, err = run_cli("train", "recipes/mla/heal-deepseek.yaml", "--set", f"model.path={base}",
                         "--set", f"train.output_dir={healed}", "--set", "train.epochs=1",
                         "--set", "train.report_to=[none]")
    assert rc == 0, err[-3000:]
    rc, _, err = run_cli("export", "deepseek", str(healed), "-o", str(exported))
    assert rc == 0, err[-3000:]
    assert json.loads((exported / "config.json").read_text())["model_type"] == "deepseek_v3"
    assert _ppl(run_cli, exported, tmp_path / "eval-exported") == pytest.approx(
        _ppl(run_cli, healed, tmp_path / "eval-healed"), rel=1e-5)
    assert _ppl(run_cli, exported, tmp_path / "eval-exported") < 1.3 * _ppl(run_cli, base, tmp_path / "eval-base")

    # stock transformers in a fresh process without tunelab reads the same logits
    code = ("import sys, torch; from transformers import AutoModelForCausalLM as A; "
            "m = A.from_pretrained(sys.argv[1]).eval(); assert type(m).__name__ == 'DeepseekV3ForCausalLM'; "
            "ids = torch.arange(3, 131)[None] * 7 % 1400 + 3; "
            "torch.save(m(input_ids=ids).logits[0].detach(), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(exported), str(tmp_path / "stock.pt")], check=True,
                   env=dict(os.environ), cwd=tmp_path)
    import torch

    from tunelab.models.inference import load_for_inference

    model, _ = load_for_inference(str(healed))
    ids = torch.arange(3, 131)[None] * 7 % 1400 + 3
    with torch.no_grad():
        ours = model(input_ids=ids).logits[0]
    torch.testing.assert_close(torch.load(tmp_path / "stock.pt", weights_only=True), ours, rtol=0, atol=1e-4)
