"""The data pipeline (data/pipeline.py): overflow and bad-row rules, mixtures, eval splits, preference pairs:
nothing is lost silently."""

import json
from pathlib import Path

import pytest

from tunelab.data.pipeline import build_datasets, encode_source, mix
from tunelab.errors import DataError
from tunelab.specs import DataSource, DataSpec


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def src(**kw) -> DataSource:
    return DataSource(**{"source": "x.jsonl", **kw})


# preference pairs: a source of format preference (test_preference_data.py's src, renamed: src is taken above)
def pair_src(**kw) -> DataSource:
    return DataSource(**{"source": "x.jsonl", "format": "preference", **kw})


GOOD = {"messages": [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2."}]}


LONG = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok " * 50}]}


BAD = {"messages": [{"role": "user", "content": "no answer"}]}


def test_bad_row_error_names_file_and_row(tok, tmp_path):
    path = write(tmp_path / "d.jsonl", [GOOD, GOOD, BAD, GOOD])
    with pytest.raises(DataError, match=r"d\.jsonl row 3: conversation has no assistant message"):
        encode_source(src(source=str(path)), "data.train[0].source", tok, DataSpec(train=[src()]))


def test_bad_row_skip_is_counted(tok, tmp_path):
    path = write(tmp_path / "d.jsonl", [GOOD, BAD, GOOD, BAD])
    rows, report = encode_source(src(source=str(path)), "k", tok, DataSpec(train=[src()], on_bad_row="skip"))
    assert len(rows) == 2 and report.skipped_bad == 2 and report.rows == 4
    assert "row 2" in report.bad_examples[0]


@pytest.mark.parametrize("mode", ["truncate", "drop", "error"])
def test_overflow_rules(tok, tmp_path, mode):
    path = write(tmp_path / "d.jsonl", [GOOD, LONG, GOOD])
    spec = DataSpec(train=[src()], max_length=64, on_overflow=mode)
    if mode == "error":
        with pytest.raises(DataError, match=r"d\.jsonl row 2: \d+ tokens, more than data.max_length=64"):
            encode_source(src(source=str(path)), "k", tok, spec)
        return
    rows, report = encode_source(src(source=str(path)), "k", tok, spec)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    if mode == "drop":
        assert (len(rows), report.dropped_overflow, report.truncated) == (2, 1, 0)
    else:  # the long row's response was cut away entirely: counted as dropped, not silently kept
        assert report.truncated == 1 and report.dropped_no_labels == 1 and len(rows) == 2


def test_truncation_keeps_rows_with_response_left(tok, tmp_path):
    long_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok " * 100}]}
    path = write(tmp_path / "d.jsonl", [long_answer])
    rows, report = encode_source(src(source=str(path)), "k", tok, DataSpec(train=[src()], max_length=32,
                                                                          on_overflow="truncate"))
    assert report.truncated == 1 and len(rows) == 1 and len(rows[0]["input_ids"]) == 32


def test_mixture_weights_and_samples():
    a = [{"id": f"a{i}"} for i in range(100)]
    b = [{"id": f"b{i}"} for i in range(50)]
    c = [{"id": f"c{i}"} for i in range(10)]
    sources = [src(weight=3.0), src(weight=1.0), src(samples=25)]
    out = mix([a, b, c], sources, seed=0)
    n_a = sum(r["id"].startswith("a") for r in out)
    n_b = sum(r["id"].startswith("b") for r in out)
    n_c = sum(r["id"].startswith("c") for r in out)
    assert (n_a, n_b, n_c) == (112, 38, 25)  # 150 weighted rows split 3:1; c repeated to 25
    assert len({r["id"] for r in out if r["id"].startswith("c")}) == 10  # every c row used before repeats
    assert mix([a, b, c], sources, seed=0) == out  # deterministic


def test_build_datasets_eval_split(tok):
    class R:  # the parts of a recipe build_datasets reads
        data = DataSpec(train=[DataSource(source="builtin:quickstart/alpaca", format="alpaca")], eval_split=0.1)

    train, ev, report = build_datasets(R(), tok)
    assert len(train) + len(ev) == report.train[0].used and len(ev) == report.train[0].used // 10
    assert set(train.column_names) == {"input_ids", "labels"}


U = {"role": "user", "content": "What is 2 plus 2?"}


GOOD_A = {"role": "assistant", "content": "2 plus 2 is 4."}


BAD_A = {"role": "assistant", "content": "I don't know."}


def _rows(n_long: int = 1):
    rows = [{"prompt": [U], "chosen": [GOOD_A], "rejected": [BAD_A]} for _ in range(3)]
    long_answer = {"role": "assistant", "content": "word " * 200}
    rows += [{"prompt": [U], "chosen": [long_answer], "rejected": [BAD_A]} for _ in range(n_long)]
    return rows


def test_overflow_counts_prompt_plus_longer_response(tmp_path, tok):
    f = write(tmp_path / "p.jsonl", _rows())
    s = pair_src(source=str(f))
    rows, rep = encode_source(s, "k", tok, DataSpec(train=[s], max_length=64, on_overflow="drop"))
    assert (rep.rows, rep.used, rep.dropped_overflow, rep.truncated) == (4, 3, 1, 0)
    assert rep.max_tokens > 64
    rows, rep = encode_source(s, "k", tok, DataSpec(train=[s], max_length=64, on_overflow="truncate"))
    assert (rep.used, rep.truncated) == (4, 1)
    assert all(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 64 for r in rows)
    assert rep.tokens == sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    with pytest.raises(DataError, match=r"row 4: \d+ tokens, more than data.max_length=64"):
        encode_source(s, "k", tok, DataSpec(train=[s], max_length=64, on_overflow="error"))


def test_bad_pair_names_file_and_row_or_is_counted(tmp_path, tok):
    rows = _rows(0) + [{"prompt": "q", "chosen": "x", "rejected": "x"}]
    f = write(tmp_path / "p.jsonl", rows)
    s = pair_src(source=str(f))
    with pytest.raises(DataError, match=r"p.jsonl row 4: chosen and rejected are identical"):
        encode_source(s, "k", tok, DataSpec(train=[s]))
    _, rep = encode_source(s, "k", tok, DataSpec(train=[s], on_bad_row="skip"))
    assert (rep.used, rep.skipped_bad) == (3, 1) and "identical" in rep.bad_examples[0]
