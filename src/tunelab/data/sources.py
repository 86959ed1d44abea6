"""Where rows come from: local jsonl/json/parquet/csv files, hub datasets, or bundled data.

Rows are read as plain dicts with their 1-based row number, so every later error can say
"file.jsonl row 17". Local files are read without ``datasets`` (fast, and no torch import);
hub datasets go through ``datasets.load_dataset``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from tunelab.errors import DataError, Problem

if TYPE_CHECKING:
    from tunelab.specs import DataSource


BUILTIN_DATA = Path(__file__).parent / "builtin"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class Resolved:
    """A data source after resolution: a local file (``path``) or a hub dataset (``hub_id``)."""

    label: str
    path: Path | None = None
    hub_id: str | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None


def builtin_names() -> list[str]:
    return sorted(str(p.relative_to(BUILTIN_DATA).with_suffix("")) for p in BUILTIN_DATA.rglob("*.jsonl"))


def resolve_source(source: str, key: str) -> Resolved:
    """Find a source: ``builtin:NAME``, an existing local file, or else a hub dataset id."""
    if source.startswith("builtin:"):
        name = source[len("builtin:") :]
        path = BUILTIN_DATA / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(Problem(key, f"unknown built-in dataset {source!r}",
                                    "known: " + ", ".join(f"builtin:{n}" for n in builtin_names())))
        return Resolved(label=source, path=path)
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
            if len(files) != 1:
                raise DataError(Problem(key, f"{source} is a directory with {len(files)} data files",
                                        "name one .jsonl/.json/.parquet/.csv file"))
            path = files[0]
        if path.suffix not in LOCAL_SUFFIXES:
            raise DataError(Problem(key, f"unsupported file type {path.suffix!r} for {source}",
                                    "use .jsonl, .json, .parquet or .csv"))
        return Resolved(label=str(path), path=path.resolve())
    if path.suffix in LOCAL_SUFFIXES or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise DataError(Problem(key, f"data file not found: {source}", "check the path; relative paths are "
                                "taken from the recipe's folder, then the current directory"))
    return Resolved(label=source, hub_id=source)


def _parse_json(path: Path, text: str) -> list[Any]:
    data = json.loads(text)
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
        raise DataError(Problem(str(path), "a .json data file must hold a list of rows"))
    if not isinstance(data, list):
        raise DataError(Problem(str(path), "a .json data file must hold a list of rows"))
    return data


class Sha256Reader:
    """A binary file read once: its sha256 grows with every byte the parser takes, and ``finish`` hashes the rest.

    So checking a file's rows and fingerprinting it is one read, not two.
    """

    def __init__(self, path: Path) -> None:
        self.fh = path.open("rb")
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def lines(self) -> Iterator[bytes]:
        for line in self.fh:
            self.hash.update(line)
            self.size += len(line)
            yield line

    def close(self) -> None:
        self.fh.close()

    def finish(self) -> tuple[str, int]:
        """(sha256 hex digest, size in bytes) of the whole file, reading what the parser left."""
        for chunk in iter(lambda: self.fh.read(1 << 20), b""):
            self.hash.update(chunk)
            self.size += len(chunk)
        self.fh.close()
        return self.hash.hexdigest(), self.size


def _rows_of_bytes(path: Path, text: Callable[[], str], limit: int | None) -> Iterator[tuple[int, Any]]:
    """(row number, row) of a .json or .csv file from its decoded text."""
    if path.suffix == ".json":
        rows = _parse_json(path, text())
        yield from enumerate(rows[:limit] if limit else rows, 1)
    else:
        for i, row in enumerate(csv.DictReader(io.StringIO(text(), newline="")), 1):
            yield i, dict(row)
            if limit is not None and i >= limit:
                return


def iter_local(path: Path, limit: int | None = None, reader: Sha256Reader | None = None) -> Iterator[tuple[int, Any]]:
    """(row number, row) pairs of a local file; row numbers are 1-based (jsonl: the line number).

    With a ``reader`` the bytes come through it (and are hashed on the way); otherwise the file is opened here.
    """
    suffix = path.suffix
    own = reader is None
    source = reader or Sha256Reader(path)
    try:
        if suffix == ".jsonl":
            count = 0
            for lineno, raw in enumerate(source.lines(), 1):
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(Problem(f"{path} row {lineno}", f"invalid JSON: {exc.msg}",
                                            "each line of a .jsonl file must be one JSON object")) from None
                yield lineno, row
                count += 1
                if limit is not None and count >= limit:
                    return
        elif suffix in (".json", ".csv"):
            yield from _rows_of_bytes(path, lambda: source.read().decode("utf-8"), limit)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(io.BytesIO(source.read()))
            if limit is not None:
                table = table.slice(0, limit)
            yield from enumerate(table.to_pylist(), 1)
    finally:
        if own:
            source.close()


def iter_hub(src: "DataSource", resolved: Resolved, limit: int | None = None) -> Iterator[tuple[int, Any]]:
    """Rows of a hub dataset (name, config, split, revision); row numbers are 1-based indices."""
    import datasets

    try:
        ds = datasets.load_dataset(resolved.hub_id, src.config, split=src.split, revision=src.revision,
                                   streaming=limit is not None)
    except Exception as exc:  # datasets raises many types for "not found" / offline
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = "hub access is off (HF_HUB_OFFLINE=1) and it is not cached" if offline else "check the id, config and split"
        raise DataError(Problem(resolved.hub_id or "", f"cannot load hub dataset: {type(exc).__name__}: {exc}"[:400],
                                hint)) from None
    for i, row in enumerate(ds, 1):
        yield i, row
        if limit is not None and i >= limit:
            return


def iter_rows(src: "DataSource", resolved: Resolved, limit: int | None = None,
              reader: Sha256Reader | None = None) -> Iterator[tuple[int, Any]]:
    """(row number, row) of a source, local (through ``reader`` when given) or on the hub."""
    if resolved.is_local:
        assert resolved.path is not None
        return iter_local(resolved.path, limit, reader)
    return iter_hub(src, resolved, limit)


def fingerprint(src: "DataSource", resolved: Resolved, digest: tuple[str, int] | None = None) -> dict[str, Any]:
    """What identifies the data a run saw: sha256 of a local file, or the hub id and revision.

    ``digest`` is (sha256, size) when the file was already read (``Sha256Reader.finish``).
    """
    if resolved.is_local:
        assert resolved.path is not None
        if digest is None:
            digest = Sha256Reader(resolved.path).finish()
        return {"source": src.source, "path": str(resolved.path), "sha256": digest[0], "bytes": digest[1]}
    return {"source": src.source, "hub_id": resolved.hub_id, "config": src.config, "split": src.split,
            "revision": src.revision}
