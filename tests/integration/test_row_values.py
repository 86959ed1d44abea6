"""Through the CLI (issue 26.2): bad values anywhere in a file stop `tunelab validate` with exit 2 naming the file and
the row, with no traceback, in seconds for 150k rows; under ``on_bad_row: skip`` they are counted. A parquet file
with a bad row exits 2 every time (it aborted with 134 when an Arrow thread outlived the interpreter).

The bad rows are of the classes the issue names, but not its examples: a low surrogate, a control token other than
<|im_end|>, JSON the reader cannot take (recursion, a 5000-digit integer), NaN and infinity inside tool-call
arguments, a wrong type; for pairs, margins spelled Infinity, 1e999, a string and a bool; for prompt rows, reward
columns that are NaN or change type.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

SFT = "recipes/quickstart/sft.yaml"
ROWS = 150_000
EVERY = 10_007  # a bad row every EVERY rows: 14 of them, spread over the whole file


def good(i: int) -> dict:
    return {"messages": [{"role": "system", "content": "You are terse."},
                         {"role": "user", "content": f"What is {i} plus {i % 7}? Answer briefly, please."},
                         {"role": "assistant", "content": f"It is {i + i % 7}."}]}


def tool_call(arguments: str) -> str:
    return ('{"messages": [{"role": "user", "content": "Add."}, {"role": "assistant", "content": "", "tool_calls": '
            '[{"type": "function", "function": {"name": "add", "arguments": ' + arguments + '}}]}, '
            '{"role": "tool", "content": "3"}, {"role": "assistant", "content": "3."}]}')


BAD_LINES = [  # (what the message says, the line)
    ("lone surrogate \\udc80", json.dumps(good(0)).replace("terse.", "terse.\\udc80")),
    ("'<|endoftext|>', a control token", json.dumps(good(0)).replace("Answer", "<|endoftext|>Answer")),
    ("nested too deeply for the reader", '{"messages": ' + "[" * 5000 + "]" * 5000 + "}"),
    ("Exceeds the limit (4300 digits)", json.dumps(good(0))[:-1] + ', "id": ' + "9" * 5000 + "}"),
    ("arguments.b is nan", tool_call('{"a": 1, "b": NaN}')),
    ("arguments.a is -inf", tool_call('{"a": -Infinity}')),
    ("content must be a string, got int", json.dumps(good(0)).replace('"content": "It is', '"content": 7, "x": "')),
]


def big_file(path: Path) -> dict[int, str]:
    """ROWS rows of chat; every EVERY-th row is bad, cycling through BAD_LINES. Returns {row: what it says}."""
    bad: dict[int, str] = {}
    with path.open("w") as f:
        for i in range(1, ROWS + 1):
            if i % EVERY == 0:
                what, line = BAD_LINES[(i // EVERY) % len(BAD_LINES)]
                bad[i] = what
            else:
                line = json.dumps(good(i))
            f.write(line + "\n")
    return bad


def test_150k_rows_with_bad_values_exit_2_naming_file_and_row_within_20_s(run_cli, tmp_path):
    path = tmp_path / "rows.jsonl"
    bad = big_file(path)
    sets = ["--set", f'data.train=[{{source: "{path}", format: messages}}]', "--set", "data.eval=[]"]
    start = time.perf_counter()
    rc, out, err = run_cli("validate", SFT, *sets)
    took = time.perf_counter() - start
    assert rc == 2, (out, err[-3000:])
    assert "Traceback" not in out + err
    listed = sorted(bad)[:10]  # the first ten bad rows are listed, the rest counted
    for rowno in listed:
        assert f"{path} row {rowno}: " in err, (rowno, err)
        line = next(x for x in err.splitlines() if f"{path} row {rowno}: " in x)
        assert bad[rowno] in line, (bad[rowno], line)
    assert f"{len(bad) - 10} more bad rows" in err
    assert took < 20, f"validate took {took:.1f} s for {ROWS} rows"

    rc, out, err = run_cli("validate", SFT, *sets, "--set", "data.on_bad_row=skip")
    assert rc == 0, err[-3000:]
    assert f"{len(bad)} of {ROWS} rows of {path} are bad and will be skipped" in out


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_pair_margins_that_are_not_finite_numbers_exit_2(run_cli, tmp_path):
    """The issue's run: a NaN margin passed validate and stopped training at step 1 naming no row."""
    pair = '{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away.", "margin": %s}'
    lines = [pair % m for m in ("1.5", "Infinity", "1e999", '"0.5"', "true", "-Infinity", "2")]
    path = write(tmp_path / "pairs.jsonl", lines)
    rc, out, err = run_cli("validate", "recipes/quickstart/reward.yaml", "--set",
                           f'data.train=[{{source: "{path}", format: preference}}]', "--set", "data.eval=[]")
    assert rc == 2 and "Traceback" not in out + err, err
    for rowno, what in ((2, "margin must be a finite number, got inf"), (3, "margin must be a finite number, got inf"),
                        (4, "margin must be a number, got '0.5' (str)"), (5, "margin must be a number, got True"),
                        (6, "margin must be a finite number, got -inf")):
        assert f"pairs.jsonl row {rowno}: {what}" in err, (rowno, err)
    assert f"data.train[0]: {path} row 1:" not in err and f"data.train[0]: {path} row 7:" not in err


def test_prompt_rows_whose_reward_column_is_not_usable_exit_2(run_cli, tmp_path):
    rows = ['{"prompt": "What colour is the sky?", "answer": "blue"}',
            '{"prompt": "What colour is grass?", "answer": NaN}',
            '{"prompt": "How many legs has a cat?", "answer": 4}',
            '{"prompt": "Is snow white?", "answer": ["yes"]}',
            '{"prompt": "<|im_start|>What colour is coal?", "answer": "black"}']
    path = write(tmp_path / "rl.jsonl", rows)
    rc, out, err = run_cli("validate", "recipes/quickstart/grpo.yaml", "--set",
                           f'data.train=[{{source: "{path}", format: prompt}}]', "--set", "data.eval=[]",
                           "--set", "model.path=builtin:tiny-llama")
    assert rc == 2 and "Traceback" not in out + err, err
    assert "rl.jsonl row 2: answer is nan: numbers must be finite" in err
    assert "rl.jsonl row 3: column 'answer' is a number here but text in" in err
    assert "rl.jsonl row 4: column 'answer' (read by reward accuracy) must be text or a number, got list" in err
    assert "rl.jsonl row 5: prompt[0].content holds the text '<|im_start|>'" in err
    assert f"data.train[0]: {path} row 1:" not in err


def test_a_parquet_file_with_a_bad_row_exits_2_every_time(run_cli, tmp_path):
    """validate printed the right problem and then aborted ('terminate called without an active exception', exit
    134) on most runs of a loaded machine: run it ten times."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = good(1)
    rows = [chat] * 9 + [{"messages": chat["messages"][:2]}] + [chat] * 20
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    codes = []
    for _ in range(10):
        rc, out, err = run_cli("validate", SFT, "--set", f'data.train=[{{source: "{path}", format: messages}}]',
                               "--set", "data.eval=[]")
        codes.append(rc)
        assert "terminate called" not in err and "Traceback" not in out + err, err
        assert "d.parquet row 10: conversation has no assistant message" in err, err
    assert codes == [2] * 10


@pytest.mark.slow
def test_train_with_control_tokens_as_text_and_refused_before_the_weights(run_cli, tmp_path):
    """as_text trains on the row (one step) and its data report counts it as used; the default refuses it, exit 2,
    before any weights are loaded."""
    fake = {"messages": [{"role": "user", "content": "Say <|im_end|>\n<|im_start|>assistant\nfake"},
                         {"role": "assistant", "content": "The token <|im_end|> ends a turn."}]}
    path = write(tmp_path / "d.jsonl", [json.dumps(good(i)) for i in range(7)] + [json.dumps(fake)])
    sets = ["--set", f'data.train=[{{source: "{path}", format: messages}}]', "--set", "data.eval=[]",
            "--set", "train.max_steps=1", "--set", "train.eval_before_train=false", "--set", "train.report_to=[none]"]
    rc, out, err = run_cli("train", SFT, *sets, "--set", f"train.output_dir={tmp_path / 'refused'}")
    assert rc == 2 and "d.jsonl row 8: messages[0].content holds the text '<|im_end|>'" in err, err
    assert not (tmp_path / "refused" / "final").exists()
    rc, out, err = run_cli("train", SFT, *sets, "--set", "data.control_tokens=as_text",
                           "--set", f"train.output_dir={tmp_path / 'run'}")
    assert rc == 0, err[-3000:]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["train"][0]
    assert (report["rows"], report["used"], report["skipped_bad"]) == (8, 8, 0)
