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
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from tunelab.data.formats import REQUIRED_FIELDS, BadRow, convert
from tunelab.data.sources import Resolved, Sha256Reader, fingerprint, iter_rows, resolve_source
from tunelab.data.tokenize import IGNORE, TemplateMismatch, encode_pair, encode_prompt, encode_row
from tunelab.errors import DataError, Problem
from tunelab.specs import DataSource, DataSpec, RecipeSpec


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


def _overflow(where: str, n: int, data_spec: "DataSpec") -> None:
    if data_spec.on_overflow == "error":
        raise DataError(Problem(where, f"{n} tokens, more than data.max_length={data_spec.max_length}",
                                "raise data.max_length, or set data.on_overflow: truncate or drop"))


def _encode_sft(canonical: dict[str, Any], where: str, tokenizer: Any, data_spec: "DataSpec",
                report: SourceReport) -> dict[str, Any] | None:
    max_len = data_spec.max_length
    ids, labels = encode_row(tokenizer, canonical, data_spec.train_on_prompt)
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
                       report: SourceReport) -> dict[str, Any] | None:
    max_len = data_spec.max_length
    p, c, r = encode_pair(tokenizer, canonical)
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
                   report: SourceReport) -> dict[str, Any] | None:
    ids = encode_prompt(tokenizer, canonical["prompt"])
    report.count_length(len(ids), data_spec.max_length)
    if len(ids) > data_spec.max_length:
        _overflow(where, len(ids), data_spec)
        report.dropped_overflow += 1  # truncate too: half a question has no right answer
        return None
    report.tokens += len(ids)
    return {**canonical, "prompt_ids": ids}


def encode_source(src: "DataSource", key: str, tokenizer: Any, data_spec: "DataSpec") -> tuple[list[dict[str, Any]], SourceReport]:
    """Read, convert and tokenize one source, applying the overflow and bad-row rules."""
    resolved = resolve_source(src.source, key)
    report = SourceReport(source=resolved.label)
    examples: list[dict[str, Any]] = []
    encode = {"preference": _encode_preference, "prompt": _encode_prompt}.get(src.format, _encode_sft)
    has_margin: set[bool] = set()
    for rowno, row in iter_rows(src, resolved):
        report.rows += 1
        where = resolved.row(rowno)
        try:
            canonical = convert(row, src)
        except BadRow as exc:
            if data_spec.on_bad_row == "error":
                raise DataError(Problem(where, str(exc), "fix the row, or set data.on_bad_row: skip")) from None
            report.skipped_bad += 1
            if len(report.bad_examples) < 5:
                report.bad_examples.append(f"{where}: {exc}")
            continue
        try:
            example = encode(canonical, where, tokenizer, data_spec, report)
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


def build_datasets(recipe: "RecipeSpec", tokenizer: Any) -> tuple[Any, Any, DataReport]:
    """(train Dataset, eval Dataset or None, report): SFT columns input_ids + labels, or the pair columns."""
    from datasets import Dataset

    d = recipe.data
    report = DataReport(max_length=d.max_length, on_overflow=d.on_overflow)
    parts = []
    for i, src in enumerate(d.train):
        rows, r = encode_source(src, f"data.train[{i}].source", tokenizer, d)
        parts.append(rows)
        report.train.append(r)
    train = mix(parts, d.train, d.seed)
    eval_parts = []
    for i, src in enumerate(d.eval):
        rows, r = encode_source(src, f"data.eval[{i}].source", tokenizer, d)
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
               ) -> tuple[list[Problem], list[str], list[CheckedSource]]:
    """Resolve every source and convert its rows; (problems, notes, checked sources). No model, no tokenizer.

    Local and bundled files are read whole (up to ``LOCAL_CHECK_ROWS`` rows), so a bad row
    anywhere (an identical preference pair on row 9000) stops the run here, not mid-training;
    the same read hashes the file for the lock file. Hub datasets are checked on their first
    rows; one that cannot be reached offline is a note, not a problem: validate runs on machines
    without hub access (CI), and training will load it where the hub is reachable.
    """
    import os

    problems: list[Problem] = []
    notes: list[str] = []
    checked: list[CheckedSource] = []
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
                reader = Sha256Reader(resolved.path) if resolved.path is not None else None
                try:  # a file that stops parsing (invalid JSON) is closed here, not when collected
                    n, bad = 0, 0
                    kept: list[tuple[int, dict[str, Any]]] = []
                    for rowno, row in iter_rows(src, resolved, limit=limit, reader=reader):
                        n += 1
                        try:
                            canonical = convert(row, src)
                            if resolved.is_local and len(kept) < KEEP_ROWS:
                                kept.append((rowno, canonical))
                        except BadRow as exc:
                            if recipe.data.on_bad_row == "error":
                                bad += 1
                                if bad <= MAX_ROW_PROBLEMS:
                                    problems.append(Problem(f"{key}: {resolved.row(rowno)}", str(exc),
                                                            f"format is {src.format!r}; fix the data, the format or "
                                                            "field_map, or set data.on_bad_row: skip"))
                    digest = reader.finish() if reader is not None else None
                finally:
                    if reader is not None:
                        reader.close()
                checked.append(CheckedSource(key, src, resolved, fingerprint(src, resolved, digest), kept))
                if bad > MAX_ROW_PROBLEMS:
                    problems.append(Problem(f"{key}: {resolved.label}", f"{bad - MAX_ROW_PROBLEMS} more bad rows"))
                if n == 0:
                    problems.append(Problem(f"{key}.source", f"{resolved.label} has no rows"))
                elif n == limit and resolved.is_local:
                    notes.append(f"{key}.source: checked the first {limit} rows of {resolved.label}")
            except DataError as exc:  # the file itself (not a row) is unreadable: name the recipe key too
                problems.extend(p if p.where.startswith(key) else Problem(f"{key}: {p.where}", p.what, p.hint)
                                for p in exc.problems)
    return problems, notes, checked


__all__ = ["CheckedSource", "DataReport", "REQUIRED_FIELDS", "build_datasets", "check_data", "encode_source",
           "source_fingerprints"]
