"""A corpus of malformed and unusual data files: each malformed one is refused by validate (exit 2 from the CLI)
naming the file and the row, each unusual-but-valid one is read as the text it is.

The files are written by the tests (bytes spelled out here), so every case says exactly what is in it.
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest

from tunelab.errors import UserError
from tunelab.recipe.validate import validate

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = REPO / "recipes/quickstart/sft.yaml"


def _line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def _chat(user="What is 2+2?", reply="4.") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


GOOD = _line(_chat())
PAIR = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."}

# (case id, file name, bytes, format, what the message says, the row it names or None for the file)
MALFORMED = [
    ("invalid-json", "d.jsonl", GOOD + b'{"messages": [}\n' + GOOD, "messages", "invalid JSON", "row 2"),
    ("truncated-last-line", "d.jsonl", GOOD + GOOD + b'{"messages": [{"role": "us', "messages", "invalid JSON", "row 3"),
    ("jsonl-holding-a-list", "d.jsonl", b"[\n" + GOOD[:-1] + b",\n" + GOOD + b"]\n", "messages",
     "looks like a JSON list", "row 1"),
    ("invalid-utf8", "d.jsonl", GOOD + GOOD + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n', "messages",
     "not UTF-8", "row 3"),
    ("latin1-file", "d.jsonl", _line(_chat("Ol\u00e9")).decode().encode("latin-1"), "messages", "not UTF-8", "row 1"),
    ("gzip-bytes-under-jsonl", "d.jsonl", gzip.compress(GOOD * 3), "messages", "gzip file", None),
    ("zip-bytes", "d.jsonl", b"PK\x03\x04" + b"\x00" * 40, "messages", "zip file", None),
    ("zstd-bytes", "d.jsonl", b"\x28\xb5\x2f\xfd" + b"\x00" * 40, "messages", "zstd file", None),
    ("utf16", "d.jsonl", GOOD.decode().encode("utf-16"), "messages", "UTF-16", None),
    ("empty-file", "d.jsonl", b"", "messages", "has no rows", None),
    ("only-blank-lines", "d.jsonl", b"\n\n  \r\n", "messages", "has no rows", None),
    ("row-is-a-list", "d.jsonl", GOOD + b"[1, 2]\n", "messages", "must be a mapping, got list", "row 2"),
    ("row-is-a-string", "d.jsonl", b'"hello"\n' + GOOD, "messages", "must be a mapping, got str", "row 1"),
    ("missing-field", "d.jsonl", GOOD + _line({"conversation": []}), "messages", "missing field 'messages'", "row 2"),
    ("messages-not-a-list", "d.jsonl", _line({"messages": "hi"}), "messages", "non-empty list", "row 1"),
    ("unknown-role", "d.jsonl", _line({"messages": [{"role": "robot", "content": "x"}]}), "messages",
     "unknown role 'robot'", "row 1"),
    ("role-not-a-string", "d.jsonl", _line({"messages": [{"role": ["user"], "content": "x"}]}), "messages",
     "'role' must be a string", "row 1"),
    ("content-a-number", "d.jsonl", _line({"messages": [{"role": "user", "content": 3}]}), "messages",
     "content must be a string, got int", "row 1"),
    ("ends-on-user-turn", "d.jsonl", GOOD + _line({"messages": _chat()["messages"] + [{"role": "user", "content": "?"}]}),
     "messages", "ends with a user turn", "row 2"),
    ("no-assistant-turn", "d.jsonl", _line({"messages": [{"role": "user", "content": "hi"}]}), "messages",
     "no assistant message", "row 1"),
    ("empty-assistant-turn", "d.jsonl", _line(_chat(reply=" ")), "messages", "(assistant) is empty", "row 1"),
    ("system-not-first", "d.jsonl", _line({"messages": _chat()["messages"][:1] + [{"role": "system", "content": "s"}]
                                           + _chat()["messages"][1:]}), "messages", "system message must come first",
     "row 1"),
    ("json-invalid", "d.json", b'[{"instruction": "a", "output": "b"},\n {"instruction": }]', "alpaca",
     "invalid JSON", "line 2 column"),
    ("json-not-a-list", "d.json", b'{"instruction": "a", "output": "b"}', "alpaca", "must hold a list of rows", None),
    ("json-item-not-an-object", "d.json", b'[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, 7]',
     "alpaca", "must be a mapping, got int", "row 3 (index 2)"),
    ("json-not-utf8", "d.json", b'[{"instruction": "caf\xe9", "output": "b"}]', "alpaca", "not UTF-8", None),
    ("csv-missing-column", "d.csv", b"instruction,input\nWhat is 2+2?,\n", "alpaca", "missing field 'output'", "row 2"),
    ("csv-extra-fields", "d.csv", b"instruction,output\na,b\nc,d,e,f\n", "alpaca", "4 fields, the header names 2",
     "row 3"),
    ("csv-not-utf8", "d.csv", b"instruction,output\na,b\nc,caf\xe9\n", "alpaca", "not UTF-8", "row 3"),
    ("csv-header-only", "d.csv", b"instruction,output\r\n", "alpaca", "has no rows", None),
    ("alpaca-wrong-type", "d.jsonl", _line({"instruction": ["a"], "output": "b"}), "alpaca",
     "instruction must be a string, got list", "row 1"),
    ("gz-truncated", "d.jsonl.gz", gzip.compress(GOOD * 50)[:-30], "messages", "cannot decompress", None),
    ("parquet-corrupt", "d.parquet", b"PAR1" + b"\x00" * 64, "messages", "not a readable parquet file", None),
    ("parquet-under-jsonl", "d.jsonl", b"PAR1" + b"\x00" * 64, "messages", "parquet file", None),
]

VALID = [
    ("utf8-bom", "d.jsonl", b"\xef\xbb\xbf" + GOOD + GOOD, "messages", 2),
    ("crlf", "d.jsonl", (GOOD[:-1] + b"\r\n") * 3, "messages", 3),
    ("blank-lines-and-trailing-space", "d.jsonl", b"\n" + GOOD + b"   \n\n" + GOOD[:-1] + b"  \t\n\n", "messages", 2),
    ("gzipped", "d.jsonl.gz", gzip.compress(GOOD * 4), "messages", 4),
    ("csv-bom-crlf-multiline", "d.csv", b'\xef\xbb\xbfinstruction,input,output\r\n"Two\r\nlines",,"ok, fine"\r\n'
     b"plain,,answer\r\n", "alpaca", 2),
    ("json-wrapped", "d.json", json.dumps({"data": [{"instruction": "a", "output": "b"}]}).encode(), "alpaca", 1),
    ("json-bom", "d.json", b"\xef\xbb\xbf" + json.dumps([{"instruction": "a", "output": "b"}]).encode(), "alpaca", 1),
    ("non-ascii", "d.jsonl", _line(_chat("\u4f60\u597d \U0001f44b", "\u00e7a va \u2014 \u2603")), "messages", 1),
    ("gzipped-csv", "d.csv.gz", gzip.compress(b"instruction,output\na,b\nc,d\n"), "alpaca", 2),
]


def _validate(tmp_path: Path, name: str, data: bytes, fmt: str, extra: tuple[str, ...] = ()):
    path = tmp_path / name
    path.write_bytes(data)
    overrides = [f'data.train=[{{source: "{path}", format: {fmt}}}]', "data.eval=[]", *extra]
    return path, validate(QUICKSTART, overrides)


@pytest.mark.parametrize("case, name, data, fmt, what, row", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_file_is_refused_naming_file_and_row(tmp_path, case, name, data, fmt, what, row):
    start = time.perf_counter()
    with pytest.raises(UserError) as info:
        _validate(tmp_path, name, data, fmt)
    assert time.perf_counter() - start < 10
    text = str(info.value)
    assert what in text, text
    assert name in text, text
    if row is not None:
        assert f"{name} {row}" in text or f"{name} {row}" in text.replace(":", ""), text


@pytest.mark.parametrize("case, name, data, fmt, rows", VALID, ids=[c[0] for c in VALID])
def test_unusual_but_valid_file_is_read(tmp_path, case, name, data, fmt, rows):
    from tunelab.data.sources import iter_local

    path, resolved = _validate(tmp_path, name, data, fmt)
    kept = resolved.sources[0].rows
    assert len(kept) == rows
    assert all(isinstance(r, dict) for _, r in iter_local(path))
    for _, row in kept:  # no byte-order mark or carriage return leaks into the text
        text = json.dumps(row)
        assert "\ufeff" not in text and "\\r" not in text.replace("Two\\r\\nlines", "") and "\\ufeff" not in text


def test_the_corpus_is_the_size_the_issue_asks():
    assert len(MALFORMED) >= 25 and len(VALID) >= 5


def test_bad_rows_are_skipped_when_asked(tmp_path):
    """on_bad_row: skip turns unreadable lines into counted bad rows (not a file-level failure)."""
    data = GOOD + b'{"messages": [}\n' + b'{"content": "caf\xe9"}\n' + GOOD
    _, resolved = _validate(tmp_path, "d.jsonl", data, "messages", ("data.on_bad_row=skip",))
    assert [n for n, _ in resolved.sources[0].rows] == [1, 4]


@pytest.mark.slow
def test_cli_exits_2_on_bad_files_and_trains_through_a_long_row(run_cli, tmp_path):
    """Through the CLI: validate and train both exit 2 naming file and row (no traceback, no weights loaded);
    a 2 MB row is measured and dropped by on_overflow (counted in data_report.json), in seconds."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(GOOD + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    packed = tmp_path / "packed.jsonl"
    packed.write_bytes(gzip.compress(GOOD))
    for path in (bad, packed):
        for cmd in ("validate", "train"):
            rc, out, err = run_cli(cmd, QUICKSTART, "--set", f'data.train=[{{source: "{path}", format: messages}}]',
                                   "--set", f"train.output_dir={tmp_path / 'run'}")
            assert rc == 2, (cmd, path, out, err)
            assert path.name in err and "Traceback" not in err + out, err
            assert ("bad.jsonl row 2" in err and "not UTF-8" in err) if path == bad else "gzip file" in err
    assert not (tmp_path / "run" / "final").exists()

    long = tmp_path / "long.jsonl"
    long.write_bytes(GOOD * 8 + _line(_chat(reply="word " * 400_000)) + GOOD * 8)
    start = time.perf_counter()
    rc, out, err = run_cli("train", QUICKSTART, "--set", f'data.train=[{{source: "{long}", format: messages}}]',
                           "--set", "data.on_overflow=drop", "--set", "train.max_steps=1", "--set", "data.eval=[]",
                           "--set", "train.eval_before_train=false", "--set", f"train.output_dir={tmp_path / 'long'}")
    assert rc == 0, err[-3000:]
    report = json.loads((tmp_path / "long" / "data_report.json").read_text())["train"][0]
    assert (report["rows"], report["used"], report["dropped_overflow"]) == (17, 16, 1)
    assert report["max_tokens"] > 400_000  # measured, not cut before it was counted
    assert time.perf_counter() - start < 120
