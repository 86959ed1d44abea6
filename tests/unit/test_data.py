"""Data formats, field maps, mixtures, overflow and bad-row rules: nothing is lost silently."""

import json
from pathlib import Path

import pytest

from tunelab.data.formats import BadRow, to_canonical
from tunelab.data.pipeline import build_datasets, encode_source, mix
from tunelab.data.sources import iter_local, resolve_source
from tunelab.errors import DataError
from tunelab.models.builtin import builtin_tokenizer
from tunelab.specs import DataSource, DataSpec


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def src(**kw) -> DataSource:
    return DataSource(**{"source": "x.jsonl", **kw})


def test_sharegpt_with_role_map_and_system():
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    out = to_canonical(row, src(format="sharegpt", system="Be kind."))
    assert out == {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}]}
    custom = {"turns": [{"speaker": "client", "text": "q"}, {"speaker": "agent", "text": "a"}]}
    out = to_canonical(custom, src(format="messages", field_map={"messages": "turns", "role": "speaker",
                                                                 "content": "text"},
                                   role_map={"client": "user", "agent": "assistant"}))
    assert [m["role"] for m in out["messages"]] == ["user", "assistant"]


def test_alpaca_prompt_completion_text():
    a = to_canonical({"instruction": "Add", "input": "2 and 3", "output": "5"}, src(format="alpaca"))
    assert a["messages"][0] == {"role": "user", "content": "Add\n\n2 and 3"}
    assert a["messages"][1] == {"role": "assistant", "content": "5"}
    pc = to_canonical({"q": "2+2=", "a": "4"}, src(format="prompt_completion", field_map={"prompt": "q",
                                                                                           "completion": "a"}))
    assert pc == {"prompt": "2+2=", "completion": "4"}
    conv = to_canonical({"prompt": [{"role": "user", "content": "hi"}], "completion": "yo"},
                        src(format="prompt_completion"))
    assert conv["messages"][-1] == {"role": "assistant", "content": "yo"}
    assert to_canonical({"text": "plain"}, src(format="text")) == {"text": "plain"}


@pytest.mark.parametrize("row, fmt, msg", [
    ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "messages", "empty"),
    ({"messages": [{"role": "robot", "content": "q"}]}, "messages", "unknown role 'robot'"),
    ({"msgs": []}, "messages", "missing field 'messages'"),
    ({"instruction": "x"}, "alpaca", "missing field 'output'"),
    ({"prompt": "p", "completion": ""}, "prompt_completion", "completion is empty"),
    ({"text": 3}, "text", "must be a string"),
])
def test_bad_rows_say_why(row, fmt, msg):
    with pytest.raises(BadRow, match=msg):
        to_canonical(row, src(format=fmt))


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


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_local_file_types(tmp_path, suffix):
    rows = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(3)]
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        write(path, rows)
    elif suffix == "json":
        path.write_text(json.dumps(rows))
    elif suffix == "csv":
        path.write_text("instruction,input,output\n" + "".join(f"say {i},,{i}\n" for i in range(3)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    got = [r for _, r in iter_local(resolve_source(str(path), "k").path)]
    assert [g["output"] for g in got] == ["0", "1", "2"]


def test_missing_file_and_offline_hub(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        resolve_source(str(tmp_path / "nope.jsonl"), "data.train[0].source")
    from tunelab.data.sources import iter_rows

    s = DataSource(source="someone/some-dataset")
    with pytest.raises(DataError, match="cannot load hub dataset"):
        list(iter_rows(s, resolve_source(s.source, "k"), limit=1))


def test_build_datasets_eval_split(tok):
    class R:  # the parts of a recipe build_datasets reads
        data = DataSpec(train=[DataSource(source="builtin:quickstart/alpaca", format="alpaca")], eval_split=0.1)

    train, ev, report = build_datasets(R(), tok)
    assert len(train) + len(ev) == report.train[0].used and len(ev) == report.train[0].used // 10
    assert set(train.column_names) == {"input_ids", "labels"}
