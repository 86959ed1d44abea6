"""CLI plumbing: fast help, the recipe library commands, exit codes, perplexity by hand."""

import math
import time

import torch
import yaml

from tunelab.eval.perplexity import perplexity
from tunelab.models.builtin import builtin_model


def test_help_is_fast_and_lists_commands(run_cli):
    start = time.perf_counter()
    rc, out, _ = run_cli("--help")
    assert time.perf_counter() - start < 2.0
    assert rc == 0
    for cmd in ("train", "validate", "eval", "generate", "merge", "recipes", "env", "convert", "export"):
        assert cmd in out


def test_recipes_ls_show_cp(run_cli, tmp_path):
    rc, out, _ = run_cli("recipes", "ls")
    assert rc == 0 and "quickstart/sft " in out and "_base" not in out
    rc, out, _ = run_cli("recipes", "show", "quickstart/sft")
    assert rc == 0 and "extends:" in out
    rc, _, err = run_cli("recipes", "show", "quickstart/sfft")
    assert rc == 2 and "did you mean builtin:quickstart/sft" in err
    rc, out, _ = run_cli("recipes", "cp", "quickstart/sft-lora", tmp_path)
    assert rc == 0
    copied = tmp_path / "sft-lora.yaml"
    assert yaml.safe_load(copied.read_text())["extends"] == "builtin:quickstart/_base"
    rc, out, err = run_cli("validate", copied)  # the copy still resolves its base outside the library
    assert rc == 0, err
    rc, _, err = run_cli("recipes", "cp", "quickstart/sft-lora", tmp_path)
    assert rc == 2 and "already exists" in err


def test_user_errors_exit_2_runtime_errors_exit_1(run_cli, tmp_path):
    rc, _, err = run_cli("merge", tmp_path, "-o", tmp_path / "out")
    assert rc == 2 and "not a PEFT adapter" in err and "Traceback" not in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    rc, _, err = run_cli("generate", broken, "hi")
    assert rc == 1 and "error:" in err and "Traceback" not in err


def test_perplexity_matches_hand_computation():
    model = builtin_model("tiny-llama").eval()
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
            {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]}]
    got = perplexity(model, rows, batch_size=2)
    nll, n = 0.0, 0
    with torch.no_grad():
        for r in rows:  # one row at a time, no padding, explicit shift
            logp = torch.log_softmax(model(input_ids=torch.tensor([r["input_ids"]])).logits[0].double(), -1)
            for t in range(1, len(r["input_ids"])):
                if r["labels"][t] != -100:
                    nll -= logp[t - 1, r["labels"][t]].item()
                    n += 1
    assert got["tokens"] == n == 5
    assert math.isclose(got["perplexity"], math.exp(nll / n), rel_tol=1e-5)
