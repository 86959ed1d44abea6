"""The long-context quickstart on CPU: a model trained at L = 128 loses perplexity at 4L; YaRN and a
short fine-tune at 4L bring 4L back within 15% of L; the result reloads in plain transformers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent


def _ppl(run_cli, model: Path, out: Path) -> dict[int, float]:
    rc, stdout, stderr = run_cli("eval", str(model), "--task", "ppl-vs-length", "--data",
                                 "builtin:long-context/long_eval", "--lengths", "128,512", "--output", str(out))
    assert rc == 0, stderr[-3000:]
    return {r["length"]: r["ppl"] for r in json.loads((out / "ppl_vs_length.json").read_text())["results"]}


@pytest.mark.slow
def test_yarn_extends_the_tiny_model_four_times(run_cli, tmp_path, long_context_base):
    pre, ext = long_context_base, tmp_path / "yarn"
    before = _ppl(run_cli, pre, tmp_path / "eval-pre")
    assert before[512] > 1.2 * before[128], before  # unseen positions: 4L is clearly worse (measured 1.30x)

    rc, stdout, err = run_cli("train", "recipes/long-context/yarn.yaml", "--set", f"model.path={pre}/final",
                              "--set", f"train.output_dir={ext}", "--set", "train.report_to=[none]")
    assert rc == 0, err[-3000:]
    assert "patch name rope, method yarn, factor 4.0, original_max_position_embeddings 128" in stdout
    after = _ppl(run_cli, ext, tmp_path / "eval-yarn")
    assert after[512] <= 1.15 * after[128], after  # the acceptance bound (measured 0.91x)

    config = json.loads((ext / "final" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["rope_theta"] == 10000.0
    assert config["rope_parameters"]["original_max_position_embeddings"] == 128
    assert config["max_position_embeddings"] == 512
    assert json.loads((ext / "final" / "tokenizer_config.json").read_text())["model_max_length"] == 512
    # plain transformers, in a fresh process with no tunelab import, gives the same logits as tunelab's loader
    code = ("import sys, torch; from transformers import AutoModelForCausalLM as A; "
            "m = A.from_pretrained(sys.argv[1]).eval(); ids = torch.arange(3, 515)[None] % 1400 + 3; "
            "torch.save(m(input_ids=ids).logits[0, -5:].detach(), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(ext / "final"), str(tmp_path / "plain.pt")], check=True,
                   env=dict(os.environ), cwd=tmp_path)
    import torch

    from tunelab.models.inference import load_for_inference

    model, _ = load_for_inference(str(ext))
    ids = torch.arange(3, 515)[None] % 1400 + 3
    with torch.no_grad():
        ours = model(input_ids=ids).logits[0, -5:]
    torch.testing.assert_close(ours, torch.load(tmp_path / "plain.pt", weights_only=True), rtol=0, atol=0)
