"""Data sources (data/sources.py): local file types, missing files, hub datasets offline."""

import json
from pathlib import Path

import pytest

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
