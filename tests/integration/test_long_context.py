"""The long-context quickstart on CPU: a model trained at L = 128 loses perplexity at 4L; the YaRN patch alone
(no training) keeps 4L within 10% of L; YaRN and a short fine-tune at 4L bring 4L back within 15% of L; the result
reloads in plain transformers."""

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


# ppl(512) / ppl(128) of the base trained at 128 (the session fixture: 6 epochs). Measured with OMP_NUM_THREADS=1:
# 1.18x unpatched, 1.02x with YaRN x4 and no training (docs/long-context.md, 10 epochs: 1.57x and 1.07x). A fine-tune
# at 512 flattens the curve with or without a patch (0.89x "none", 0.88x YaRN), so only the untrained patched model
# shows that the patch itself extends the context.
UNPATCHED_RATIO = 1.12
YARN_UNTRAINED_RATIO = 1.10


@pytest.mark.slow
def test_yarn_alone_flattens_the_untrained_models_curve(long_context_base):
    """The YaRN patch (factor 4 from 128, as yarn.yaml), applied to the L = 128 model with no training: perplexity at
    4L stays within 10% of L, where the unpatched model loses more than 12%."""
    from tunelab.eval.long_context import ppl_vs_length, text_token_ids
    from tunelab.models.inference import load_for_inference
    from tunelab.patches.rope import RopePatch, apply_rope

    ratios = {}
    for patched in (False, True):
        model, tok = load_for_inference(str(long_context_base))
        if patched:
            record = apply_rope(model, RopePatch(name="rope", method="yarn", factor=4,
                                                 original_max_position_embeddings=128), tok)
            assert record["max_position_embeddings"] == 512
        ids = text_token_ids("builtin:long-context/long_eval", tok, "text", 100_000)
        ppl = {r["length"]: r["ppl"] for r in ppl_vs_length(model, ids, [128, 512])}
        ratios[patched] = ppl[512] / ppl[128]
    assert ratios[False] > UNPATCHED_RATIO, ratios
    assert ratios[True] < YARN_UNTRAINED_RATIO, ratios


@pytest.mark.slow
def test_yarn_extends_the_tiny_model_four_times(run_cli, tmp_path, long_context_base):
    pre, ext = long_context_base, tmp_path / "yarn"
    before = _ppl(run_cli, pre, tmp_path / "eval-pre")
    assert before[512] > UNPATCHED_RATIO * before[128], before  # unseen positions: 4L is clearly worse

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
