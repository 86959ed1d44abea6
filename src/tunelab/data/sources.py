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
from typing import TYPE_CHECKING, Any, Iterator
from zlib import error as zlib_error

from tunelab.data.formats import Unreadable
from tunelab.errors import DataError, Problem

if TYPE_CHECKING:
    from tunelab.specs import DataSource


BUILTIN_DATA = Path(__file__).parent / "builtin"
TEXT_SUFFIXES = (".jsonl", ".json", ".csv")
LOCAL_SUFFIXES = (*TEXT_SUFFIXES, ".parquet")


@dataclass(frozen=True)
class Resolved:
    """A data source after resolution: a local file (``path``) or a hub dataset (``hub_id``)."""

    label: str
    path: Path | None = None
    hub_id: str | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None

    def row(self, rowno: int) -> str:
        """Where a row is, for messages: ``file.jsonl row 17`` (the line), ``file.json row 3 (index 2)``."""
        if self.path is not None and data_kind(self.path)[0] == ".json":
            return f"{self.label} row {rowno} (index {rowno - 1})"
        return f"{self.label} row {rowno}"


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
            files = sorted(p for p in path.iterdir() if data_kind(p)[0] in LOCAL_SUFFIXES)
            if len(files) != 1:
                raise DataError(Problem(key, f"{source} is a directory with {len(files)} data files",
                                        "name one .jsonl/.json/.parquet/.csv file"))
            path = files[0]
        if data_kind(path)[0] not in LOCAL_SUFFIXES:
            raise DataError(Problem(key, f"unsupported file type {path.suffix!r} for {source}",
                                    "use .jsonl, .json, .parquet or .csv (or .jsonl.gz, .json.gz, .csv.gz)"))
        return Resolved(label=str(path), path=path.resolve())
    if data_kind(path)[0] in LOCAL_SUFFIXES or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise DataError(Problem(key, f"data file not found: {source}", "check the path; relative paths are "
                                "taken from the recipe's folder, then the current directory"))
    return Resolved(label=source, hub_id=source)


# the first bytes of compressed files (a .jsonl that is really a .jsonl.gz is a common upload mistake)
MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd",
         b"PK\x03\x04": "zip", b"PAR1": "parquet"}
UTF8_BOM = b"\xef\xbb\xbf"
csv.field_size_limit(2**31 - 1)  # a long response in one csv field is data, not an error (the default limit is 128 KiB)


def file_error(path: Path, what: str, hint: str = "") -> DataError:
    return DataError(Problem(str(path), what, hint))


def _sniff(path: Path, head: bytes, kind: str) -> None:
    """Refuse bytes that are not text of the file's kind, naming what they are."""
    for magic, name in MAGIC.items():
        if head.startswith(magic) and not (name == "parquet" and kind == "parquet"):
            if name == "gzip":
                hint = f"name it {path.name}.gz (tunelab reads .gz files), or gunzip it"
            elif name == "parquet":
                hint = f"name it {path.with_suffix('.parquet').name}"
            else:
                hint = f"decompress it ({name} files are not read directly)"
            raise file_error(path, f"this is a {name} file, not {kind} text", hint)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise file_error(path, "the file is UTF-16 text (it starts with a UTF-16 byte-order mark)",
                         "save it as UTF-8 (in Excel: CSV UTF-8; in an editor: encoding UTF-8)")


def _utf8(raw: bytes, where: str) -> str | Unreadable:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Unreadable(f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at byte {exc.start} of the {where} "
                          "(save the file as UTF-8)")


def _parse_json(path: Path, text: str) -> list[Any]:
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(Problem(f"{path} line {exc.lineno} column {exc.colno}", f"invalid JSON: {exc.msg}",
                                "a .json data file holds one JSON list of rows; one row per line is .jsonl")) from None
    except RecursionError:  # one row nested thousands deep fails the whole list: no row number to name
        raise DataError(Problem(str(path), "the JSON is nested too deeply for the reader (thousands of levels of "
                                "[ or {) somewhere in the file", "save it as .jsonl (one row per line) to have "
                                "the row named, or fix the nesting")) from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise DataError(Problem(str(path), f"the JSON reader cannot take this file: {exc}"[:300],
                                "save it as .jsonl (one row per line) to have the row named")) from None
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

    def readline(self, n: int = -1) -> bytes:
        data = self.fh.readline(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def close(self) -> None:
        self.fh.close()

    def finish(self) -> tuple[str, int]:
        """(sha256 hex digest, size in bytes) of the whole file, reading what the parser left."""
        for chunk in iter(lambda: self.fh.read(1 << 20), b""):
            self.hash.update(chunk)
            self.size += len(chunk)
        self.fh.close()
        return self.hash.hexdigest(), self.size


MAX_ROW_BYTES = 64 << 20  # a jsonl line longer than this is a bad row: no text that long fits a context


def _capped(readline: Any, cap: int, first: bytes = b"") -> Iterator[bytes | int]:
    """Lines of a binary stream (``first``: what a ``readline(cap + 1)`` already took); a line over ``cap``
    bytes is never held whole: its length comes instead.

    So one giant line (a whole dataset saved without newlines, a base64 blob) is a bad row with its number,
    not a MemoryError for the whole file.
    """
    while True:
        line, first = first or readline(cap + 1), b""
        if not line:
            return
        if len(line) <= cap or line.endswith(b"\n"):
            yield line
            continue
        size = len(line)
        while not line.endswith(b"\n"):
            line = readline(1 << 20)
            if not line:
                break
            size += len(line)
        yield size


def data_kind(path: Path) -> tuple[str, bool]:
    """(.jsonl/.json/.csv/.parquet, gzip-compressed) of a data file's name (``rows.jsonl.gz`` -> (.jsonl, True))."""
    suffixes = path.suffixes
    if len(suffixes) >= 2 and suffixes[-1] == ".gz" and suffixes[-2] in TEXT_SUFFIXES:
        return suffixes[-2], True
    return path.suffix, False


def _jsonl_rows(path: Path, lines: Iterator[bytes | int], limit: int | None) -> Iterator[tuple[int, Any]]:
    """Rows of a jsonl file; a line the JSON reader cannot take (invalid, too deep, too long) is ``Unreadable``."""
    count = 0
    for lineno, raw in enumerate(lines, 1):
        if isinstance(raw, int):
            yield lineno, Unreadable(f"the line is {raw / (1 << 20):.0f} MiB, more than the {MAX_ROW_BYTES >> 20} MiB "
                                     "a row may be (a file without line breaks? split it into one row per line)")
            count += 1
            if limit is not None and count >= limit:
                return
            continue
        if lineno == 1 and raw.startswith(UTF8_BOM):  # what Windows editors and Excel write
            raw = raw[len(UTF8_BOM):]
        line = _utf8(raw, "line")
        if isinstance(line, str):
            if not line.strip():
                continue
            row = _json_row(line, lineno)
        else:
            row = line
        yield lineno, row
        count += 1
        if limit is not None and count >= limit:
            return


def _json_row(line: str, lineno: int) -> Any:
    """One jsonl line parsed, or ``Unreadable`` saying why the JSON reader refused it.

    Besides invalid JSON the reader itself can fail on valid-looking text: nesting deeper than Python's
    recursion limit (RecursionError) or an integer of more than 4300 digits (ValueError). Both are this
    row's fault, so they are bad rows with the line's number, not a crash of the whole run.
    """
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        hint = ("this looks like a JSON list: name the file .json" if lineno == 1 and line.lstrip()[:1] == "["
                else "each line of a .jsonl file must be one JSON object")
        return Unreadable(f"invalid JSON at column {exc.colno}: {exc.msg} ({hint})")
    except RecursionError:
        return Unreadable("the JSON is nested too deeply for the reader (thousands of levels of [ or {)")
    except ValueError as exc:  # int digit limit
        return Unreadable(f"the JSON reader cannot take this line: {exc}"[:300])


def _csv_rows(path: Path, data: bytes, limit: int | None) -> Iterator[tuple[int, Any]]:
    """Rows of a csv file, numbered by their line (the header is line 1, as a spreadsheet numbers them)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(Problem(f"{path} row {line}", f"not UTF-8 text (byte 0x{data[exc.start]:02x})",
                                "save the file as UTF-8 (in Excel: CSV UTF-8)")) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    count = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(Problem(f"{path} row {reader.line_num}", f"unreadable csv: {exc}")) from None
        if None in row:  # more fields than the header names
            yield reader.line_num, Unreadable(f"{len(reader.fieldnames or []) + len(row[None])} fields, the header "
                                              f"names {len(reader.fieldnames or [])}")  # type: ignore[call-overload]
        else:
            yield reader.line_num, dict(row)
        count += 1
        if limit is not None and count >= limit:
            return


PARQUET_BATCH = 1024  # rows converted to Python at a time: a file is never held as Python objects whole


def _parquet_rows(path: Path, data: bytes, limit: int | None) -> Iterator[tuple[int, Any]]:
    """Rows of a parquet file (1-based), read batch by batch on this thread.

    Not ``pq.read_table``: it scans through Arrow's dataset layer on Arrow's thread pool, and a pool thread
    may drop the last reference to the file's buffer (a Python ``bytes``) after the call returned. When that
    happens while the interpreter is exiting (validate found a bad row and exits 2), the thread cannot take
    the GIL, CPython ends it with ``pthread_exit``, and the unwind through Arrow's C++ frame aborts the
    process ("terminate called without an active exception", exit 134). ``ParquetFile.iter_batches`` with
    ``use_threads=False`` does every read, and every release, on the calling thread.

    A batch that fails to become Python objects (e.g. a string that is not UTF-8) is converted row by row,
    so only the row at fault is ``Unreadable``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
    except pa.ArrowException as exc:
        raise file_error(path, f"not a readable parquet file: {exc}"[:300]) from None
    rowno = 0
    try:
        batches = pf.iter_batches(batch_size=PARQUET_BATCH, use_threads=False)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except pa.ArrowException as exc:  # a corrupt page: the rows after it cannot be located
                raise file_error(path, f"cannot read the rows after row {rowno}: {exc}"[:300],
                                 "the file is damaged; write it again") from None
            try:
                rows: list[Any] = batch.to_pylist()
            except (pa.ArrowException, ValueError, OverflowError, RecursionError):
                rows = [_parquet_row(batch, i) for i in range(batch.num_rows)]
            for row in rows:
                rowno += 1
                yield rowno, row
                if limit is not None and rowno >= limit:
                    return
    finally:
        pf.close()


def _parquet_row(batch: Any, i: int) -> Any:
    import pyarrow as pa

    try:
        return batch.slice(i, 1).to_pylist()[0]
    except (pa.ArrowException, ValueError, OverflowError, RecursionError) as exc:
        return Unreadable(f"the parquet reader cannot convert this row: {type(exc).__name__}: {exc}"[:300])


def iter_local(path: Path, limit: int | None = None, reader: Sha256Reader | None = None) -> Iterator[tuple[int, Any]]:
    """(row number, row) pairs of a local file; row numbers are 1-based (jsonl and csv: the line number).

    With a ``reader`` the bytes come through it (and are hashed on the way); otherwise the file is opened here.
    A UTF-8 byte-order mark, CRLF line ends and blank lines are read as the text they are; compressed or
    UTF-16 bytes under a text name stop with the file named; a ``.gz`` file is decompressed on the way.
    A jsonl line that is not valid UTF-8 or JSON, that the JSON reader itself fails on (nesting, a huge
    integer) or that is longer than ``MAX_ROW_BYTES`` is yielded as ``Unreadable`` (a bad row, with its
    number); so is a parquet row that cannot be converted to Python.
    """
    kind, gz = data_kind(path)
    own = reader is None
    source = reader or Sha256Reader(path)
    try:
        stream: Any = source
        if gz:
            import gzip

            stream = gzip.GzipFile(fileobj=source, mode="rb")  # type: ignore[call-overload]
        try:
            if kind == ".jsonl":
                first = stream.readline(MAX_ROW_BYTES + 1)
                _sniff(path, first, "jsonl")
                yield from _jsonl_rows(path, _capped(stream.readline, MAX_ROW_BYTES, first), limit)
            elif kind == ".json":
                data = stream.read()
                _sniff(path, data[:8], "json")
                if data.startswith(UTF8_BOM):
                    data = data[len(UTF8_BOM):]
                text = _utf8(data, "file")
                if isinstance(text, Unreadable):
                    raise file_error(path, text.reason)
                rows = _parse_json(path, text)
                yield from enumerate(rows[:limit] if limit else rows, 1)
            elif kind == ".csv":
                data = stream.read()
                _sniff(path, data[:8], "csv")
                yield from _csv_rows(path, data, limit)
            elif kind == ".parquet":
                yield from _parquet_rows(path, source.read(), limit)
        except (OSError, EOFError, zlib_error) as exc:  # a truncated or corrupt .gz
            raise file_error(path, f"cannot decompress: {exc}", "check the file is complete (gzip -t)") from None
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
