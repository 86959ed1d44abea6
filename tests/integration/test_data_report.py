"""`tunelab train` writes exact data counts to RUN/data_report.json: every row is used, truncated, dropped or
skipped, and the report says which (data/pipeline.py counts, train.py writes them).

The data files are made here with a known number of rows of each kind at ``data.max_length`` 64, and one
1-step run per overflow rule checks every count of the train and the eval source:

- short rows (a question and a one-token answer): used as they are;
- long answers (a short question, an answer of ~120 tokens): truncate keeps the start of the answer (used,
  truncated); drop drops them;
- long prompts (a question of ~200 tokens, a short answer): truncate cuts the whole answer away, so the row
  is counted as truncated and then dropped for having no response tokens; drop drops them;
- bad rows (no assistant message): skipped under ``on_bad_row: skip`` under either rule.
"""

import json
import random

import pytest

SHORT = {"messages": [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2."}]}
LONG_ANSWER = {"messages": [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "one two three " * 40}]}
LONG_PROMPT = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
BAD = {"messages": [{"role": "user", "content": "no answer"}]}

# (short, long answers, long prompts, bad) per file
TRAIN = (6, 3, 2, 4)
EVAL = (3, 1, 2, 1)


def write(path, counts):
    short, long_answer, long_prompt, bad = counts
    rows = [SHORT] * short + [LONG_ANSWER] * long_answer + [LONG_PROMPT] * long_prompt + [BAD] * bad
    random.Random(0).shuffle(rows)  # the kinds interleaved, the bad rows not all at the end
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def expected(counts, on_overflow):
    """The counts data/pipeline.py must report for a file of ``counts`` rows under ``on_overflow``."""
    short, long_answer, long_prompt, bad = counts
    if on_overflow == "drop":
        used, truncated, dropped, no_labels = short, 0, long_answer + long_prompt, 0
    else:
        used, truncated, dropped, no_labels = short + long_answer, long_answer + long_prompt, 0, long_prompt
    return {"rows": sum(counts), "used": used, "truncated": truncated, "dropped_overflow": dropped,
            "dropped_no_labels": no_labels, "skipped_bad": bad}


@pytest.mark.parametrize("on_overflow", ["drop", "truncate"])
def test_data_report_counts_every_row(run_cli, tmp_path, on_overflow):
    train = write(tmp_path / "train.jsonl", TRAIN)
    held_out = write(tmp_path / "eval.jsonl", EVAL)
    out = tmp_path / "run"
    sets = [f"train.output_dir={out}", f"data.train=[{{source: {train}, format: messages}}]",
            f"data.eval=[{{source: {held_out}, format: messages}}]", "data.max_length=64",
            f"data.on_overflow={on_overflow}", "data.on_bad_row=skip", "train.max_steps=1",
            "train.eval_before_train=false", "train.report_to=[none]"]
    rc, stdout, stderr = run_cli("train", "recipes/quickstart/sft.yaml", *[a for s in sets for a in ("--set", s)])
    assert rc == 0, stderr[-3000:]
    report = json.loads((out / "data_report.json").read_text())
    assert (report["max_length"], report["on_overflow"]) == (64, on_overflow)
    for split, counts, path in (("train", TRAIN, train), ("eval", EVAL, held_out)):
        (source,) = report[split]
        assert source["source"] == str(path)
        got = {k: source[k] for k in ("rows", "used", "truncated", "dropped_overflow", "dropped_no_labels",
                                      "skipped_bad")}
        assert got == expected(counts, on_overflow), split
        # every row is accounted for exactly once (a truncated row is used or dropped for no labels)
        assert got["rows"] == got["used"] + got["dropped_overflow"] + got["dropped_no_labels"] + got["skipped_bad"]
        assert len(source["bad_examples"]) == min(5, counts[3])
        assert all("conversation has no assistant message" in b for b in source["bad_examples"])
        assert source["max_tokens"] > 64 and source["label_tokens"] > 0
    assert (report["train_rows"], report["eval_rows"]) == (expected(TRAIN, on_overflow)["used"],
                                                           expected(EVAL, on_overflow)["used"])
    # the same counts are printed for the user
    log = stdout + stderr
    e = expected(TRAIN, on_overflow)
    assert (f"train {train}: {e['rows']} rows -> {e['used']} used; truncated {e['truncated']}, dropped "
            f"{e['dropped_overflow']} over max_length=64, {e['dropped_no_labels']} with no response tokens, "
            f"skipped {e['skipped_bad']} bad") in log
