"""Data sources (data/sources.py): local file types, missing files, hub datasets offline."""

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.data import sources
from tunelab.data.formats import BadRow, Unreadable, convert
from tunelab.data.sources import iter_local, resolve_source
from tunelab.errors import DataError
from tunelab.specs import DataSource


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


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


# --- a row the reader itself fails on is a bad row; parquet on one thread (issue 26.2) -----------------------------
# recursion depth, integer size and line length are the row's fault, with its number

CHAT3 = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]

def test_a_lone_surrogate_read_from_a_json_escape_is_named_with_its_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": CHAT3}) + "\n" + '{"messages": [{"role": "user", "content": "x\\udbff"}, '
                    '{"role": "assistant", "content": "y"}]}\n')
    rows = list(iter_local(path))
    assert [n for n, _ in rows] == [1, 2]
    with pytest.raises(BadRow, match=r"lone surrogate \\udbff at character 1"):
        convert(rows[1][1], DataSource(source="x.jsonl"))

@pytest.mark.parametrize("line, why", [
    ('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply for the reader"),
    ('{"messages": [], "id": ' + "7" * 5000 + "}", "Exceeds the limit (4300 digits)"),
], ids=["recursion", "int-digits"])
def test_a_line_the_json_reader_itself_fails_on_is_an_unreadable_row_with_its_number(tmp_path, line, why):
    good = json.dumps({"messages": CHAT3})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([good, line, good]) + "\n")
    rows = list(iter_local(path))
    assert [n for n, _ in rows] == [1, 2, 3]
    assert isinstance(rows[1][1], Unreadable) and why in rows[1][1].reason
    with pytest.raises(BadRow, match=re.escape(why)):
        convert(rows[1][1], DataSource(source="x.jsonl"))

def test_a_json_file_the_reader_fails_on_is_a_file_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[" + json.dumps({"messages": CHAT3}) + ', {"x": ' + "[" * 100_000 + "]" * 100_000 + "}]")
    with pytest.raises(DataError, match=r"d\.json: the JSON is nested too deeply.*save it as \.jsonl"):
        list(iter_local(path))

def test_a_line_longer_than_the_row_limit_is_a_bad_row_and_later_rows_keep_their_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_ROW_BYTES", 1000)
    good = json.dumps({"messages": CHAT3})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([good, json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}), good]) + "\n")
    rows = list(iter_local(path))
    assert [n for n, _ in rows] == [1, 2, 3]
    assert isinstance(rows[1][1], Unreadable) and "MiB a row may be" in rows[1][1].reason
    assert rows[2][1] == {"messages": CHAT3}
    # the first line too (it is also the one sniffed for gzip/parquet bytes), and in a .gz file
    import gzip

    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(("x" * 3000 + "\n" + good + "\n").encode()))
    rows = list(iter_local(gz))
    assert isinstance(rows[0][1], Unreadable) and rows[1] == (2, {"messages": CHAT3})

def test_the_sha256_still_covers_every_byte_when_a_long_line_is_read_in_pieces(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setattr(sources, "MAX_ROW_BYTES", 100)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": CHAT3}) + "\n" + "y" * 10_000 + "\n" + json.dumps({"messages": CHAT3}) + "\n")
    reader = sources.Sha256Reader(path)
    list(iter_local(path, reader=reader))
    assert reader.finish()[0] == hashlib.sha256(path.read_bytes()).hexdigest()

def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path

def test_parquet_rows_are_numbered_and_read_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PARQUET_BATCH", 4)
    rows = [{"messages": CHAT3}] * 9 + [{"messages": [CHAT3[0]]}] + [{"messages": CHAT3}] * 5
    path = _parquet(tmp_path / "d.parquet", rows)
    got = list(iter_local(path))
    assert [n for n, _ in got] == list(range(1, 16)) and got[9][1] == {"messages": [CHAT3[0]]}
    assert [n for n, _ in iter_local(path, limit=6)] == list(range(1, 7))

def test_reading_parquet_leaves_no_arrow_thread_behind(tmp_path):
    """The cause of exit 134 ('terminate called without an active exception'): ``pq.read_table`` scans on Arrow's
    thread pool, and a pool thread that releases the file's Python buffer while the interpreter exits aborts the
    process. Read here, no thread is started, so none is alive at exit (deterministic, unlike the abort)."""
    path = _parquet(tmp_path / "d.parquet", [{"messages": CHAT3}] * 50)
    script = (
        "import os, sys, pyarrow, pyarrow.parquet\n"
        "from pathlib import Path\n"
        "from tunelab.data.sources import iter_local\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "rows = list(iter_local(Path(sys.argv[1])))\n"
        "print(len(rows), before, len(os.listdir('/proc/self/task')))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env,
                         timeout=60, check=True).stdout.split()
    assert out[0] == "50" and out[1] == out[2], f"threads before and after reading: {out[1:]}"
