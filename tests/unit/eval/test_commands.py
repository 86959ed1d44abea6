"""`tunelab eval --task passkey|ppl-vs-length` (eval/commands.py): the files written and the option errors."""

import json


def test_cli_passkey(run_cli, tmp_path):
    rc, out, err = run_cli("eval", "builtin:tiny-llama", "--task", "passkey", "--lengths", "128,256", "--depths",
                           "0,1", "--trials", "2", "--output", tmp_path)
    assert rc == 0, err
    grid = json.loads((tmp_path / "passkey.json").read_text())
    assert grid["lengths"] == [128, 256] and grid["depths"] == [0.0, 1.0] and len(grid["cases"]) == 8
    assert len(grid["accuracy"]) == 2 and all(len(row) == 2 for row in grid["accuracy"])
    assert (tmp_path / "passkey.png").stat().st_size > 1000
    assert "mean accuracy" in out and "d=0.5" not in out and "d=1" in out


def test_cli_ppl_vs_length(run_cli, tmp_path):
    rc, out, err = run_cli("eval", "builtin:tiny-llama", "--task", "ppl-vs-length", "--data", "builtin:quickstart/text",
                           "--format", "text", "--lengths", "64,128", "--max-tokens", "1500", "--output", tmp_path)
    assert rc == 0, err
    report = json.loads((tmp_path / "ppl_vs_length.json").read_text())
    assert [r["length"] for r in report["results"]] == [64, 128]
    assert all(r["ppl"] > 1 and r["tokens"] > 0 for r in report["results"])
    assert (tmp_path / "ppl_vs_length.png").stat().st_size > 1000


def test_cli_long_context_user_errors(run_cli, tmp_path):
    rc, _, err = run_cli("eval", "builtin:tiny-llama", "--task", "ppl-vs-length", "--lengths", "64")
    assert rc == 2 and "--data" in err and "Traceback" not in err
    rc, _, err = run_cli("eval", "builtin:tiny-llama", "--task", "passkey", "--depths", "0,1.5")
    assert rc == 2 and "--depths" in err
    rc, _, err = run_cli("eval", "builtin:tiny-llama", "--task", "passkey", "--lengths", "16,256", "-o", tmp_path)
    assert rc == 2 and "--lengths" in err and "minimum" in err and not (tmp_path / "passkey.json").exists()
    rc, _, err = run_cli("eval", "builtin:tiny-llama", "--task", "ppl-vs-length", "--data", "builtin:quickstart/text",
                         "--lengths", "64,512", "--max-tokens", "300")
    assert rc == 2 and "--max-tokens 300" in err and "512" in err


def test_cli_lm_eval_user_errors_before_any_weights(run_cli, tmp_path):
    """--task lm-eval:...: wrong options and unknown tasks exit 2 naming the option (the model is never loaded:
    the MODEL here does not exist)."""
    from tunelab.eval import harness

    missing = tmp_path / "no-model"
    rc, _, err = run_cli("eval", missing, "--task", "lm-eval:tinyfacts", "--data", "builtin:quickstart/sft")
    assert rc == 2 and "--data" in err and "lm-eval tasks read their own data" in err
    rc, _, err = run_cli("eval", missing, "--task", "passkey", "--lm-eval-include", tmp_path)
    assert rc == 2 and "--lm-eval-include" in err
    rc, _, err = run_cli("eval", missing, "--task", "lm-eval:")
    assert rc == 2 and "no lm-eval task named" in err
    rc, _, err = run_cli("eval", missing, "--task", "nope")
    assert rc == 2 and "lm-eval:TASK" in err
    if harness.installed():
        rc, _, err = run_cli("eval", missing, "--task", "lm-eval:tinyfact", "--lm-eval-include", tmp_path / "x")
        assert rc == 2 and "--lm-eval-include" in err and "is not a folder" in err and "Traceback" not in err
