"""Calibration tokens for the MLA patch: any data source a recipe can name, read as running text.

Rows are read as running text: ``text`` rows as they are, conversations through the tokenizer's
chat template, prompt/completion pairs joined. Documents are joined with the EOS token and cut
into ``calibration_samples`` rows of ``calibration_length`` tokens.
"""

from __future__ import annotations

from typing import Any

from tunelab.data.formats import BadRow, to_canonical
from tunelab.data.sources import iter_rows, resolve_source
from tunelab.errors import DataError, Problem
from tunelab.patches.mla.block import CALIBRATION_FORMATS, Keys, MlaPatch, recipe_keys
from tunelab.specs import DataSource


def detect_calibration_format(row: Any) -> str | None:
    """The format of a calibration row from its columns, or None when they fit none."""
    if not isinstance(row, dict):
        return None
    for fmt, columns in (("text", ("text",)), ("messages", ("messages",)), ("sharegpt", ("conversations",)),
                         ("alpaca", ("instruction", "output")), ("prompt_completion", ("prompt", "completion"))):
        if all(c in row for c in columns):
            return fmt
    return None


def _calibration_source(spec: MlaPatch, key: Keys, row: Any) -> Any:
    """The DataSource that reads calibration rows, its format given or taken from ``row``."""

    fmt = spec.calibration_format or detect_calibration_format(row)
    if fmt is None:
        cols = ", ".join(map(str, row)) if isinstance(row, dict) and row else "none"
        raise DataError(Problem(key("calibration_data"), f"cannot tell the format of {spec.calibration_data} from its "
                                f"columns ({cols})", f"set {key('calibration_format')}: "
                                + " | ".join(CALIBRATION_FORMATS)))
    return DataSource(source=spec.calibration_data or "", format=fmt)  # type: ignore[arg-type]


def _reader(spec: MlaPatch) -> Any:
    """A DataSource to read the calibration rows with (a hub dataset's split "train", no config)."""

    return DataSource(source=spec.calibration_data or "", format=spec.calibration_format or "text")


def calibration_problems(spec: MlaPatch, key: Keys) -> list[Problem]:
    """The calibration source resolves and, when local, its first row reads in its format (no tokenizer)."""
    if not spec.calibration_data:
        return []

    try:
        resolved = resolve_source(spec.calibration_data, key("calibration_data"))
        if not resolved.is_local:
            return []  # a hub dataset: read when the patch is applied
        for rowno, row in iter_rows(_reader(spec), resolved, limit=1):
            src = _calibration_source(spec, key, row)
            try:
                to_canonical(row, src)
            except BadRow as exc:
                return [Problem(key("calibration_data"), f"{resolved.row(rowno)}: {exc}",
                                f"read as {src.format}; set {key('calibration_format')} to match the data")]
    except DataError as exc:
        return list(exc.problems)
    return []


# ---- calibration tokens and applying the patch ----------------------------------------------------


def _document_ids(canonical: dict[str, Any], tokenizer: Any) -> list[int]:
    """One calibration row as token ids: text as it is, a conversation through the chat template."""
    if "messages" in canonical:
        if getattr(tokenizer, "chat_template", None):
            out = tokenizer.apply_chat_template(canonical["messages"], tokenize=True, return_dict=True)
            return list(out["input_ids"])
        text = "\n".join(m["content"] for m in canonical["messages"])
    elif "prompt" in canonical:
        text = f"{canonical['prompt']}{canonical['completion']}"
    else:
        text = canonical["text"]
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def calibration_token_ids(spec: MlaPatch, tokenizer: Any, key: Keys | None = None) -> list[list[int]]:
    """``calibration_samples`` rows of ``calibration_length`` token ids from ``calibration_data``.

    Documents are joined with the EOS token; rows are read only as far as needed. Too few tokens
    is a DataError naming the keys to change (``key``: field -> its name, default the recipe's).
    """
    key = key or recipe_keys("patches")

    if not spec.calibration_data:
        raise ValueError("no calibration_data to read")
    resolved = resolve_source(spec.calibration_data, key("calibration_data"))
    need = spec.calibration_samples * spec.calibration_length
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    src = None
    rows = bad = 0
    # each usable row gives a token at least: the limit bounds a local read and makes a hub read stream
    for _, row in iter_rows(_reader(spec), resolved, limit=need):
        rows += 1
        if src is None:
            src = _calibration_source(spec, key, row)
        try:
            doc = _document_ids(to_canonical(row, src), tokenizer)
        except BadRow:
            bad += 1
            continue
        if ids and eos is not None:
            ids.append(eos)
        ids.extend(doc)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise DataError(Problem(key("calibration_data"), f"{resolved.label} gives {len(ids)} tokens ({rows} rows, "
                                f"{bad} unusable); calibration needs calibration_samples x calibration_length = "
                                f"{spec.calibration_samples} x {spec.calibration_length} = {need}",
                                f"use more data, or lower {key('calibration_samples')} or "
                                f"{key('calibration_length')}"))
    length = spec.calibration_length
    return [ids[i * length : (i + 1) * length] for i in range(spec.calibration_samples)]
