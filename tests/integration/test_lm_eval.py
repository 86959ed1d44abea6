"""lm-evaluation-harness through tunelab, offline, end to end: ``tunelab eval RUN --task lm-eval:tinyfacts`` and a
recipe's ``eval.lm_eval`` block after training put scores in summary.json that equal an accuracy computed here
with a forward pass of our own (transformers directly, not lm-eval, not tunelab's loader).

tinyfacts (tests/assets/lm_eval/tinyfacts/) is our 20-row, 4-choice task: the invented facts of the quickstart
data. Both runs start from a directory that is not the repository, so the task's relative data path is read
beside its YAML.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tunelab.eval import harness

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "tests" / "assets" / "lm_eval"
ROWS = [json.loads(line) for line in (TASKS / "tinyfacts" / "tinyfacts.jsonl").read_text().splitlines()]

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _lm_eval_installed():
    if not harness.installed():
        if os.environ.get("CI"):
            pytest.fail('lm-eval is not installed (pip install -e ".[dev]")')
        pytest.skip('lm-eval is not installed (pip install "tunelab[lm-eval]")')


def load(model_dir: Path, adapter: Path | None = None):
    """(model, tokenizer) with transformers and PEFT directly; an adapter stays unmerged (tunelab merges it)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), AutoTokenizer.from_pretrained(adapter or model_dir)


def predictions(model, tok, rows: list[dict]) -> list[int]:
    """The choice the model prefers in each row: the largest sum of log p(continuation token | everything before).

    The definition lm-eval's loglikelihood implements, written out: the continuation is " " + choice (the
    task's target_delimiter), its tokens are those of context + continuation after the context's own.
    """
    import torch

    picks = []
    with torch.no_grad():
        for row in rows:
            context = tok.encode(row["context"])
            lls = []
            for choice in row["choices"]:
                whole = tok.encode(row["context"] + " " + choice)
                assert whole[: len(context)] == context
                logp = model(torch.tensor([whole[:-1]])).logits[0].float().log_softmax(-1)
                lls.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
            picks.append(max(range(len(lls)), key=lls.__getitem__))
    return picks


def accuracy(model_dir: Path, rows: list[dict], adapter: Path | None = None) -> float:
    picks = predictions(*load(model_dir, adapter), rows)
    assert len(set(picks)) > 1, "the model picks the same position every time: a score that tests nothing"
    return sum(p == r["label"] for p, r in zip(picks, rows)) / len(rows)


def test_cli_scores_a_run_and_records_them_in_its_summary(quickstart_sft, run_cli, tmp_path):
    src, rc, _, err = quickstart_sft
    assert rc == 0, err[-2000:]
    run = tmp_path / "run"  # a copy: the session's run is shared with other tests
    shutil.copytree(src / "final", run / "final")
    for name in ("recipe.lock.yaml", "summary.json"):
        shutil.copy(src / name, run / name)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()

    rc, out, err = run_cli("eval", run, "--task", "lm-eval:tinyfacts", "--lm-eval-include", TASKS, "--limit", "16",
                           "--batch-size", "3", "-o", tmp_path / "out", cwd=elsewhere)
    assert rc == 0, err[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    got = summary["lm_eval"]["tinyfacts"]
    want = accuracy(run / "final", ROWS[:16])
    assert got["acc"] == pytest.approx(want, abs=1e-9) and got["samples"] == 16
    assert 0 <= got["acc_norm"] <= 1 and got["acc_stderr"] > 0
    assert "global_step" in summary and "eval_after" in summary  # the training's entries are kept
    assert json.loads((tmp_path / "out" / "lm_eval.json").read_text())["scores"] == summary["lm_eval"]
    table = [line.split() for line in out.splitlines() if line.startswith("tinyfacts")]
    assert ["tinyfacts", "acc", f"{want:.4f}", f"{got['acc_stderr']:.4f}"] in table


def test_recipe_eval_block_scores_a_lora_run_after_training(run_cli, tmp_path):
    """``eval.lm_eval`` in a LoRA recipe: after training, final/ (an adapter) is scored merged into its base and
    summary.json holds the scores (beside the held-out perplexity); lm_eval.json lies in the run directory.
    60 steps move the adapter far enough that the base alone scores differently (checked, so that scoring
    the base by mistake would fail)."""
    out = tmp_path / "run"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    rc, stdout, err = run_cli(
        "train", REPO / "recipes/quickstart/sft-lora.yaml", "--set", f"train.output_dir={out}",
        "--set", "train.max_steps=60", "--set", "train.report_to=[none]", "--set", "train.eval_before_train=false",
        "--set", f"eval.lm_eval={{tasks: [tinyfacts], include: {TASKS}, batch_size: 4}}", cwd=elsewhere)
    assert rc == 0, err[-3000:]
    base = json.loads((out / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    summary = json.loads((out / "summary.json").read_text())
    want = accuracy(Path(base), ROWS, adapter=out / "final")
    assert want != accuracy(Path(base), ROWS), "the adapter does not change the score: train it longer"
    assert summary["lm_eval"]["tinyfacts"]["acc"] == pytest.approx(want, abs=1e-9)
    assert summary["lm_eval"]["tinyfacts"]["samples"] == 20 and "eval_after" in summary
    assert json.loads((out / "lm_eval.json").read_text())["scores"] == summary["lm_eval"]
    assert stdout.index("tinyfacts  acc") < stdout.index("done:")


def test_a_standard_task_pointed_at_a_local_copy_of_its_data(run_cli, tmp_path):
    """docs/evaluation.md's offline recipe: lm-eval's own arc_easy.yaml, copied into an include folder with only
    its dataset lines changed to local JSONL files, replaces the hub one under the same name. The rows here are
    made up in ARC's layout (question, choices.text/label, answerKey)."""
    import importlib.util

    shipped = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks" / "arc" / "arc_easy.yaml"
    text = shipped.read_text()
    hub = "dataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\n"
    assert hub in text, "lm-eval's arc_easy.yaml changed: update docs/evaluation.md"
    local = ("dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
             + "".join(f"    {split}: ARC-Easy/{split}.jsonl\n" for split in ("train", "validation", "test")))
    (tmp_path / "tasks" / "arc" / "ARC-Easy").mkdir(parents=True)
    (tmp_path / "tasks" / "arc" / "arc_easy.yaml").write_text(text.replace(hub, local))
    rows = [{"id": f"q{i}", "question": f"Which number comes after {i}?",
             "choices": {"text": [str(i + 1), str(i + 2), str(i + 3)], "label": ["A", "B", "C"]}, "answerKey": "A"}
            for i in range(6)]
    for split in ("train", "validation", "test"):
        (tmp_path / "tasks" / "arc" / "ARC-Easy" / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))

    rc, out, err = run_cli("eval", "builtin:tiny-llama", "--task", "lm-eval:arc_easy", "--lm-eval-include",
                           tmp_path / "tasks", "--limit", "5", "-o", tmp_path / "out", cwd=tmp_path)
    assert rc == 0, err[-3000:]
    report = json.loads((tmp_path / "out" / "lm_eval.json").read_text())
    assert report["scores"]["arc_easy"]["samples"] == 5 and 0 <= report["scores"]["arc_easy"]["acc"] <= 1
    assert report["configs"]["arc_easy"]["dataset_kwargs"]["data_files"]["test"] == \
        str(tmp_path / "tasks" / "arc" / "ARC-Easy" / "test.jsonl")
