"""Where rows come from: local jsonl/json/parquet/csv files, hub datasets, or bundled data.

Rows are read as plain dicts with their 1-based row number, so every later error can say
"file.jsonl row 17". Local files are read without ``datasets`` (fast, and no torch import);
hub datasets go through ``datasets.load_dataset``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tunelab.errors import DataError, Problem

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


def _read_json(path: Path) -> list[Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
        raise DataError(Problem(str(path), "a .json data file must hold a list of rows"))
    if not isinstance(data, list):
        raise DataError(Problem(str(path), "a .json data file must hold a list of rows"))
    return data


def iter_local(path: Path, limit: int | None = None) -> Iterator[tuple[int, Any]]:
    """(row number, row) pairs of a local file; row numbers are 1-based (jsonl: the line number)."""
    suffix = path.suffix
    count = 0
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
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
    elif suffix == ".json":
        for i, row in enumerate(_read_json(path)[:limit] if limit else _read_json(path), 1):
            yield i, row
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            for i, row in enumerate(csv.DictReader(fh), 1):
                yield i, dict(row)
                if limit is not None and i >= limit:
                    return
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if limit is not None:
            table = table.slice(0, limit)
        for i, row in enumerate(table.to_pylist(), 1):
            yield i, row


def iter_hub(src: Any, resolved: Resolved, limit: int | None = None) -> Iterator[tuple[int, Any]]:
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


def iter_rows(src: Any, resolved: Resolved, limit: int | None = None) -> Iterator[tuple[int, Any]]:
    if resolved.is_local:
        assert resolved.path is not None
        return iter_local(resolved.path, limit)
    return iter_hub(src, resolved, limit)


def fingerprint(src: Any, resolved: Resolved) -> dict[str, Any]:
    """What identifies the data a run saw: sha256 of a local file, or the hub id and revision."""
    if resolved.is_local:
        assert resolved.path is not None
        h = hashlib.sha256()
        with resolved.path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return {"source": src.source, "path": str(resolved.path), "sha256": h.hexdigest(),
                "bytes": resolved.path.stat().st_size}
    return {"source": src.source, "hub_id": resolved.hub_id, "config": src.config, "split": src.split,
            "revision": src.revision}
