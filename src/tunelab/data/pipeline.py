"""Build the training and eval datasets of a recipe, and check its data without loading a model.

Every row is converted (formats), tokenized (tokenize) and measured against ``max_length``.
SFT rows become ``input_ids`` + ``labels``; preference pairs become ``prompt_ids``,
``chosen_ids``, ``rejected_ids`` (and ``margin`` when the data has one), measured as prompt +
the longer response, and truncated by cutting the responses. Prompt-only rows (online RL)
become ``prompt`` (messages, for TRL) + ``prompt_ids`` + their extra columns; a prompt over
``max_length`` is dropped or an error (cutting a prompt changes the question).
Rows that overflow are truncated, dropped or reported as errors as the recipe says; bad rows
stop the run with file and row, or are counted and skipped. The counts go into a
``DataReport`` that is printed and saved in the run directory: nothing is lost silently.

A bad row is one that does not fit its format, one whose values cannot be used (``formats.check_values``:
invalid Unicode, a non-finite number, a value nested too deep), one whose text holds a control token of the
tokenizer (``data.control_tokens: error``; ``as_text`` encodes such text as plain tokens instead), and for
prompt rows one whose extra column changes type from row to row (the columns become Arrow columns).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from tunelab.data.formats import REQUIRED_FIELDS, BadRow, convert_keyed
from tunelab.data.sources import Resolved, Sha256Reader, fingerprint, iter_rows, resolve_source
from tunelab.data.templates import ControlTokens, control_tokens
from tunelab.data.tokenize import IGNORE, TemplateMismatch, encode_pair, encode_prompt, encode_row
from tunelab.errors import DataError, Problem
from tunelab.specs import DataSource, DataSpec, RecipeSpec

RowCheck = Callable[[dict[str, Any]], None]  # a check of one canonical prompt row that raises BadRow


@dataclass
class SourceReport:
    """What happened to the rows of one source."""

    source: str
    rows: int = 0
    used: int = 0
    truncated: int = 0
    dropped_overflow: int = 0
    dropped_no_labels: int = 0
    skipped_bad: int = 0
    bad_examples: list[str] = field(default_factory=list)
    tokens: int = 0
    label_tokens: int = 0
    max_tokens: int = 0
    # rows by measured length (before any truncation): 10 equal bins over [0, max_length], then one for longer rows
    length_histogram: list[int] = field(default_factory=lambda: [0] * 11)

    def count_length(self, n: int, max_length: int) -> None:
        self.max_tokens = max(self.max_tokens, n)
        self.length_histogram[min(9, n * 10 // max(1, max_length)) if n <= max_length else 10] += 1


@dataclass
class DataReport:
    """Per-source counts for train and eval, written to ``data_report.json`` in the run dir."""

    max_length: int
    on_overflow: str
    train: list[SourceReport] = field(default_factory=list)
    eval: list[SourceReport] = field(default_factory=list)
    train_rows: int = 0
    eval_rows: int = 0

    def lines(self) -> list[str]:
        out = []
        for split, reports in (("train", self.train), ("eval", self.eval)):
            for r in reports:
                out.append(
                    f"{split} {r.source}: {r.rows} rows -> {r.used} used; truncated {r.truncated}, dropped "
                    f"{r.dropped_overflow} over max_length={self.max_length}, {r.dropped_no_labels} with no "
                    f"response tokens, skipped {r.skipped_bad} bad; {r.tokens} tokens ({r.label_tokens} trained), "
                    f"longest {r.max_tokens}"
                )
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ColumnKinds:
    """The type of each extra column of prompt rows, as the first row with a value gave it.

    The rows become one Arrow table for the trainer, and an Arrow column holds one type: an ``answer`` that
    is text on row 1 and a number on row 900 would stop training when the table is built, naming nothing.
    """

    def __init__(self) -> None:
        self.first: dict[str, tuple[str, str]] = {}  # column -> (kind, where it was first seen)

    def check(self, canonical: dict[str, Any], where: Callable[[], str]) -> None:
        """BadRow if a column's type differs from its first row's; ``where`` names this row (called rarely)."""
        found = [(k, _kind(v)) for k, v in canonical.items() if k != "prompt" and v is not None]
        for column, kind in found:
            seen = self.first.get(column)
            if seen is not None and seen[0] != kind:
                raise BadRow(f"column {column!r} is {kind} here but {seen[0]} in {seen[1]}: a column holds one type "
                             f"(write every value as {seen[0]})")
        for column, kind in found:
            if column not in self.first:
                self.first[column] = (kind, where())


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def printable(exc: Exception) -> str:
    """A bad row's reason as text any terminal (and data_report.json) takes: a lone surrogate the row carried
    into the message (an unknown role, a key) is written as its escape instead of failing the print."""
    return str(exc).encode("utf-8", "backslashreplace").decode("utf-8")


def control_problem(control: ControlTokens | None, canonical: dict[str, Any], fmt: str, row_json: str,
                    mode: str) -> None:
    """BadRow when the rendered text of a row holds a control token and it may not be encoded as text.

    Prompt rows are refused under either mode: trainers render them again themselves (TRL applies the
    chat template), so tunelab cannot encode their control-token text as plain tokens.
    """
    if control is None or (mode == "as_text" and fmt != "prompt"):
        return
    hit = control.find(canonical, fmt, row_json)
    if hit is None:
        return
    where, token = hit
    fix = ("remove it from the prompt (prompt rows are rendered by the trainer, so data.control_tokens: as_text "
           "does not apply to them)" if fmt == "prompt" else
           "remove it, or set data.control_tokens: as_text to train on it as plain text")
    raise BadRow(f"{where} holds the text {token!r}, a control token of the tokenizer: it would be read as the "
                 f"token itself (a fake turn or end of text inside the row); {fix}")


def _overflow(where: str, n: int, data_spec: "DataSpec") -> None:
    if data_spec.on_overflow == "error":
        raise DataError(Problem(where, f"{n} tokens, more than data.max_length={data_spec.max_length}",
                                "raise data.max_length, or set data.on_overflow: truncate or drop"))


def _encode_sft(canonical: dict[str, Any], where: str, tokenizer: Any, data_spec: "DataSpec",
                report: SourceReport, literal: ControlTokens | None) -> dict[str, Any] | None:
    max_len = data_spec.max_length
    ids, labels = encode_row(tokenizer, canonical, data_spec.train_on_prompt, literal)
    report.count_length(len(ids), max_len)
    if len(ids) > max_len:
        _overflow(where, len(ids), data_spec)
        if data_spec.on_overflow == "drop":
            report.dropped_overflow += 1
            return None
        ids, labels = ids[:max_len], labels[:max_len]
        report.truncated += 1
    if all(t == IGNORE for t in labels[1:]):
        report.dropped_no_labels += 1
        return None
    report.tokens += len(ids)
    report.label_tokens += sum(t != IGNORE for t in labels[1:])
    return {"input_ids": ids, "labels": labels}


def _encode_preference(canonical: dict[str, Any], where: str, tokenizer: Any, data_spec: "DataSpec",
                       report: SourceReport, literal: ControlTokens | None) -> dict[str, Any] | None:
    max_len = data_spec.max_length
    p, c, r = encode_pair(tokenizer, canonical, literal)
    longest = len(p) + max(len(c), len(r))
    report.count_length(longest, max_len)
    if longest > max_len:
        _overflow(where, longest, data_spec)
        if data_spec.on_overflow == "drop" or len(p) >= max_len:  # a prompt that fills max_length leaves no response
            report.dropped_overflow += 1
            return None
        c, r = c[: max_len - len(p)], r[: max_len - len(p)]
        report.truncated += 1
        if c == r:
            report.dropped_no_labels += 1
            return None
    report.tokens += 2 * len(p) + len(c) + len(r)
    report.label_tokens += len(c) + len(r)
    out: dict[str, Any] = {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
    if "margin" in canonical:
        out["margin"] = canonical["margin"]
    return out


def _encode_prompt(canonical: dict[str, Any], where: str, tokenizer: Any, data_spec: "DataSpec",
                   report: SourceReport, literal: ControlTokens | None) -> dict[str, Any] | None:
    ids = encode_prompt(tokenizer, canonical["prompt"])
    report.count_length(len(ids), data_spec.max_length)
    if len(ids) > data_spec.max_length:
        _overflow(where, len(ids), data_spec)
        report.dropped_overflow += 1  # truncate too: half a question has no right answer
        return None
    report.tokens += len(ids)
    return {**canonical, "prompt_ids": ids}


def encode_source(src: "DataSource", key: str, tokenizer: Any, data_spec: "DataSpec",
                  kinds: ColumnKinds | None = None, row_checks: Sequence[RowCheck] = (),
                  ) -> tuple[list[dict[str, Any]], SourceReport]:
    """Read, convert and tokenize one source, applying the overflow and bad-row rules.

    ``kinds``: the extra-column types of prompt rows seen so far (shared by the sources of one dataset);
    ``row_checks``: what the method reads of each prompt row (validate's, so that a row skipped there under
    ``on_bad_row: skip`` is skipped here too).
    """
    resolved = resolve_source(src.source, key)
    report = SourceReport(source=resolved.label)
    examples: list[dict[str, Any]] = []
    encode = {"preference": _encode_preference, "prompt": _encode_prompt}.get(src.format, _encode_sft)
    control = control_tokens(tokenizer) or None
    mode = data_spec.control_tokens
    literal = control if mode == "as_text" and src.format != "prompt" else None
    kinds = kinds if kinds is not None else ColumnKinds()
    has_margin: set[bool] = set()
    for rowno, row in iter_rows(src, resolved):
        report.rows += 1
        where = resolved.row(rowno)
        try:
            canonical, row_json = convert_keyed(row, src)
            control_problem(control, canonical, src.format, row_json, mode)
            if src.format == "prompt":
                kinds.check(canonical, lambda: where)
                for check in row_checks:
                    check(canonical)
        except BadRow as exc:
            if data_spec.on_bad_row == "error":
                raise DataError(Problem(where, printable(exc), "fix the row, or set data.on_bad_row: skip")) from None
            report.skipped_bad += 1
            if len(report.bad_examples) < 5:
                report.bad_examples.append(f"{where}: {printable(exc)}")
            continue
        try:
            example = encode(canonical, where, tokenizer, data_spec, report, literal)
        except TemplateMismatch as exc:  # never trained with a guessed mask, and not skippable: the template is wrong
            raise DataError(Problem(f"model.chat_template: {where}", str(exc))) from None
        if example is None:
            continue
        has_margin.add("margin" in example)
        if len(has_margin) > 1:
            raise DataError(Problem(where, "some pairs have a margin and others do not",
                                    "give every pair a margin, or none"))
        report.used += 1
        examples.append(example)
    if report.rows == 0:
        raise DataError(Problem(key, f"{resolved.label} has no rows"))
    if report.used == 0:
        raise DataError(Problem(key, f"no usable rows in {resolved.label}", "; ".join(report.bad_examples[:2])
                                or f"all {report.rows} rows were dropped (see data.max_length / on_overflow)"))
    return examples, report


def mix(parts: list[list[dict[str, Any]]], sources: list[Any], seed: int) -> list[dict[str, Any]]:
    """Combine sources: ``samples: N`` takes exactly N rows; ``weight`` shares the weighted sources' total.

    Rows are drawn without replacement while they last, then repeated (deterministic, seeded).
    Sources with neither are taken whole.
    """
    rng = random.Random(seed)
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    total_weighted = sum(len(parts[i]) for i in weighted)
    weight_sum = sum(sources[i].weight for i in weighted)
    out: list[dict[str, Any]] = []
    for i, (rows, src) in enumerate(zip(parts, sources)):
        if src.samples is not None:
            n = src.samples
        elif src.weight is not None:
            n = max(1, round(total_weighted * src.weight / weight_sum))
        else:
            out.extend(rows)
            continue
        order: list[int] = []
        while len(order) < n:
            block = list(range(len(rows)))
            rng.shuffle(block)
            order.extend(block)
        out.extend(rows[j] for j in order[:n])
    return out


def build_datasets(recipe: "RecipeSpec", tokenizer: Any, row_checks: Sequence[RowCheck] = ()
                   ) -> tuple[Any, Any, DataReport]:
    """(train Dataset, eval Dataset or None, report): SFT columns input_ids + labels, or the pair columns.

    ``row_checks``: what the method reads of each prompt row (``ResolvedRecipe.row_checks``)."""
    from datasets import Dataset

    d = recipe.data
    report = DataReport(max_length=d.max_length, on_overflow=d.on_overflow)
    parts = []
    kinds = ColumnKinds()
    for i, src in enumerate(d.train):
        rows, r = encode_source(src, f"data.train[{i}].source", tokenizer, d, kinds, row_checks)
        parts.append(rows)
        report.train.append(r)
    train = mix(parts, d.train, d.seed)
    eval_parts = []
    for i, src in enumerate(d.eval):
        rows, r = encode_source(src, f"data.eval[{i}].source", tokenizer, d, kinds, row_checks)
        eval_parts.append(rows)
        report.eval.append(r)
    eval_rows = mix(eval_parts, d.eval, d.seed)
    if not d.eval and d.eval_split > 0:
        rng = random.Random(d.seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        n_eval = max(1, int(len(train) * d.eval_split))
        held = set(order[:n_eval])
        eval_rows = [train[j] for j in sorted(held)]
        train = [row for j, row in enumerate(train) if j not in held]
    report.train_rows, report.eval_rows = len(train), len(eval_rows)

    if len({frozenset(part[0]) for part in parts + eval_parts}) > 1:
        raise DataError(Problem("data", "train and eval sources mix formats (SFT rows and preference pairs, "
                                    "or pairs with and without margin)", "use one kind of data for one method"))

    def to_ds(rows: list[dict[str, Any]]) -> Any:
        return Dataset.from_dict({c: [r[c] for r in rows] for c in rows[0]})

    return to_ds(train), (to_ds(eval_rows) if eval_rows else None), report


def source_fingerprints(extra: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Fingerprints of (recipe key, data source) pairs read as text: the data the recipe's patches read."""
    out = []
    for key, source in extra:
        src = DataSource(source=source, format="text")
        out.append({"split": key, **fingerprint(src, resolve_source(source, key))})
    return out


LOCAL_CHECK_ROWS = 200_000  # validate converts every row of a local file up to this many
MAX_ROW_PROBLEMS = 10  # bad rows listed per source; the rest are counted


KEEP_ROWS = 2000  # converted rows of each local source kept for the checks that follow (template, reward columns)


@dataclass
class CheckedSource:
    """One data source as validate read it: resolved, every row checked, fingerprinted, its first rows kept.

    The file is read once for all of that; training reads it once more, to tokenize it.
    """

    key: str  # the recipe key, e.g. data.train[0]
    source: DataSource
    resolved: Resolved
    fingerprint: dict[str, Any]  # for the lock file
    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (row number, canonical row), local only


def check_data(recipe: "RecipeSpec", first_rows: int = 5, accepted_formats: tuple[str, ...] | None = None,
               control: ControlTokens | None = None, row_checks: Sequence[RowCheck] = (),
               ) -> tuple[list[Problem], list[str], list[CheckedSource]]:
    """Resolve every source and convert its rows; (problems, notes, checked sources). No model, no tokenizer.

    Local and bundled files are read whole (up to ``LOCAL_CHECK_ROWS`` rows), so a bad row
    anywhere (an identical preference pair on row 9000) stops the run here, not mid-training;
    the same read hashes the file for the lock file. Every value of every row is checked
    (``formats.check_values``), and with ``control`` (the tokenizer's control tokens, read from its files)
    every row's text is searched for them; ``row_checks`` (the reward columns a method reads) run on
    every prompt row. Bad rows are problems under ``data.on_bad_row: error`` and a counted note under
    ``skip``. Eval rows that are also training rows (the same canonical row, so the same rendering) are
    a note with their count. Hub datasets are checked on their first rows; one that cannot be reached
    offline is a note, not a problem: validate runs on machines without hub access (CI), and training
    will load it where the hub is reachable.
    """
    import os

    problems: list[Problem] = []
    notes: list[str] = []
    checked: list[CheckedSource] = []
    mode = recipe.data.control_tokens
    kinds = ColumnKinds()
    train_rows: set[int] | None = set() if recipe.data.eval else None  # hashes of the training rows' JSON
    for split in ("train", "eval"):
        for i, src in enumerate(getattr(recipe.data, split)):
            key = f"data.{split}[{i}]"
            if accepted_formats is not None and src.format not in accepted_formats:
                problems.append(Problem(f"{key}.format", f"format {src.format!r} does not fit method "
                                        f"{recipe.method.name!r}", "use one of: " + ", ".join(accepted_formats)))
                continue
            try:
                resolved = resolve_source(src.source, f"{key}.source")
                if not resolved.is_local and (os.environ.get("HF_HUB_OFFLINE") == "1"
                                              or os.environ.get("HF_DATASETS_OFFLINE") == "1"):
                    notes.append(f"{key}.source: hub dataset {resolved.hub_id!r} not checked (offline)")
                    checked.append(CheckedSource(key, src, resolved, fingerprint(src, resolved)))
                    continue
                limit = LOCAL_CHECK_ROWS if resolved.is_local else first_rows
                checks = row_checks if src.format == "prompt" else ()
                reader = Sha256Reader(resolved.path) if resolved.path is not None else None
                try:  # a file that stops parsing (invalid JSON) is closed here, not when collected
                    n, bad, duplicates = 0, 0, 0
                    skipped: list[str] = []
                    kept: list[tuple[int, dict[str, Any]]] = []
                    for rowno, row in iter_rows(src, resolved, limit=limit, reader=reader):
                        n += 1
                        try:
                            canonical, row_json = convert_keyed(row, src)
                            control_problem(control, canonical, src.format, row_json, mode)
                            for check in checks:
                                check(canonical)
                            if src.format == "prompt":
                                kinds.check(canonical, lambda rowno=rowno: resolved.row(rowno))  # type: ignore[misc]
                        except BadRow as exc:
                            bad += 1
                            where = resolved.row(rowno)
                            if recipe.data.on_bad_row == "error":
                                if bad <= MAX_ROW_PROBLEMS:
                                    problems.append(Problem(f"{key}: {where}", printable(exc),
                                                            f"format is {src.format!r}; fix the data, the format or "
                                                            "field_map, or set data.on_bad_row: skip"))
                            elif len(skipped) < 2:
                                skipped.append(f"{where}: {printable(exc)}")
                            continue
                        if resolved.is_local and len(kept) < KEEP_ROWS:
                            kept.append((rowno, canonical))
                        if train_rows is not None:
                            if split == "train":
                                train_rows.add(hash(row_json))
                            elif hash(row_json) in train_rows:
                                duplicates += 1
                    digest = reader.finish() if reader is not None else None
                finally:
                    if reader is not None:
                        reader.close()
                checked.append(CheckedSource(key, src, resolved, fingerprint(src, resolved, digest), kept))
                if bad > MAX_ROW_PROBLEMS and recipe.data.on_bad_row == "error":
                    problems.append(Problem(f"{key}: {resolved.label}", f"{bad - MAX_ROW_PROBLEMS} more bad rows"))
                if bad and recipe.data.on_bad_row == "skip":
                    notes.append(f"{key}.source: {bad} of {n} rows of {resolved.label} are bad and will be skipped "
                                 f"(data.on_bad_row: skip), e.g. {'; '.join(skipped)}")
                if duplicates:
                    notes.append(f"{key}.source: {duplicates} rows of {resolved.label} are also in the training data "
                                 "(identical after conversion, so identical once rendered): eval loss on them "
                                 "measures memorisation")
                if n == 0:
                    problems.append(Problem(f"{key}.source", f"{resolved.label} has no rows"))
                elif n == limit and resolved.is_local:
                    notes.append(f"{key}.source: checked the first {limit} rows of {resolved.label}")
            except DataError as exc:  # the file itself (not a row) is unreadable: name the recipe key too
                problems.extend(p if p.where.startswith(key) else Problem(f"{key}: {p.where}", p.what, p.hint)
                                for p in exc.problems)
    return problems, notes, checked


__all__ = ["CheckedSource", "ColumnKinds", "DataReport", "REQUIRED_FIELDS", "RowCheck", "build_datasets",
           "check_data", "control_problem", "encode_source", "source_fingerprints"]
