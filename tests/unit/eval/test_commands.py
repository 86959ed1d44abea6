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
