"""``tunelab plan``'s look at the data: token-length histograms and the first examples with their loss masks.

Both go through the pipeline's own encoders (``encode_source``, ``encode_row``, ``encode_pair``), so what is
shown is what training uses.
"""


from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunelab.data.formats import BadRow, convert
from tunelab.data.pipeline import encode_source
from tunelab.data.sources import iter_rows, resolve_source
from tunelab.data.tokenize import IGNORE, TemplateMismatch, encode_pair, encode_prompt, encode_row

if TYPE_CHECKING:
    from tunelab.recipe.schema import Recipe
    from tunelab.specs import DataSource



@dataclass
class LengthHistogram:
    """Token lengths of one training source against ``data.max_length``, and what the pipeline does with them."""

    source: str
    lengths: list[int]
    max_length: int
    on_overflow: str
    report: Any  # the pipeline's SourceReport under the recipe's rules (on_overflow: error counted as drop)

    def bins(self) -> list[tuple[str, int]]:
        """Counts per bin: eighths up to max_length, then 1.5x, 2x, 4x max_length and beyond."""
        L = self.max_length
        edges = [0, L // 8, L // 4, L // 2, 3 * L // 4, L, 3 * L // 2, 2 * L, 4 * L]
        out = []
        for lo, hi in zip(edges, edges[1:]):
            out.append((f"{lo + 1}-{hi}", sum(lo < n <= hi for n in self.lengths)))
        out.append((f">{edges[-1]}", sum(n > edges[-1] for n in self.lengths)))
        return out


def _row_length(example: dict[str, Any]) -> int:
    if "input_ids" in example:
        return len(example["input_ids"])
    if "chosen_ids" in example:
        return len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))
    return len(example["prompt_ids"])


def offline_hub_source(src: "DataSource", key: str) -> bool:
    """A hub dataset on a machine told to stay offline: not read (as ``validate`` does)."""
    import os

    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    return offline and not resolve_source(src.source, key).is_local


def length_histograms(recipe: "Recipe", tokenizer: Any) -> list[LengthHistogram]:
    """Tokenize every training source with the pipeline twice: unbounded (every row's length) and under
    the recipe's ``max_length`` / ``on_overflow`` (the truncated and dropped counts training will report).
    Hub datasets are skipped when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set."""
    d = recipe.data
    out = []
    for i, src in enumerate(d.train):
        key = f"data.train[{i}].source"
        if offline_hub_source(src, key):
            continue
        # model_copy does not validate: max_length may exceed what a recipe may set
        unbounded = d.model_copy(update={"max_length": 1 << 40, "on_overflow": "truncate", "train_on_prompt": True})
        rows, _ = encode_source(src, key, tokenizer, unbounded)
        rules = d.model_copy(update={"on_overflow": "drop" if d.on_overflow == "error" else d.on_overflow})
        _, report = encode_source(src, key, tokenizer, rules)
        out.append(LengthHistogram(report.source, [_row_length(r) for r in rows], d.max_length, d.on_overflow,
                                   report))
    return out


def render_first_example(recipe: "Recipe", tokenizer: Any, color: bool = False) -> tuple[str, str]:
    """(source label, the first training row rendered by the chat template with the loss mask shown)."""
    blocks = render_examples(recipe, tokenizer, color)
    return blocks[0] if blocks else (recipe.data.train[0].source, "(no convertible row)")


def render_examples(recipe: "Recipe", tokenizer: Any, color: bool = False) -> list[tuple[str, str]]:
    """(heading, rendering) of each train source's first example through the chat template, loss tokens marked.

    Tokens that get loss are shown inside ``[[ ]]`` (green when ``color``); the mask comes from the
    pipeline's own tokenization (``encode_row`` / ``encode_pair``), so it is the one training uses.
    Conversations: the first row, and the first multi-turn row when the first has one assistant
    turn. Preference pairs: prompt + chosen and prompt + rejected. Prompts (online RL): the
    rendered prompt the policy continues (no loss tokens: the loss is on generated text).
    """
    out: list[tuple[str, str]] = []
    for i, src in enumerate(recipe.data.train):
        key = f"data.train[{i}].source"
        if offline_hub_source(src, key):
            out.append((src.source, "(not read: a hub dataset, and this machine is set offline)"))
            continue
        resolved = resolve_source(src.source, key)
        found_multi = False
        shown = 0
        for rowno, row in iter_rows(src, resolved, limit=200):
            try:
                canonical = convert(row, src)
            except BadRow:
                continue
            label = resolved.row(rowno)
            try:
                if src.format == "preference":
                    p, c, r = encode_pair(tokenizer, canonical)
                    out.append((f"{label}, prompt + chosen", _show_mask(tokenizer, p + c, [0] * len(p) + [1] * len(c),
                                                                       color)))
                    out.append((f"{label}, prompt + rejected",
                                _show_mask(tokenizer, p + r, [0] * len(p) + [1] * len(r), color)))
                    break
                if src.format == "prompt":
                    ids = encode_prompt(tokenizer, canonical["prompt"])
                    out.append((f"{label}, the prompt the policy continues (loss is on its generations)",
                                _show_mask(tokenizer, ids, [0] * len(ids), color)))
                    break
                turns = sum(m["role"] == "assistant" for m in canonical.get("messages", []))
                if shown and (turns < 2 or found_multi):
                    continue
                ids, labels = encode_row(tokenizer, canonical, recipe.data.train_on_prompt)
            except TemplateMismatch as exc:
                out.append((label, f"(no exact loss mask: {exc})"))
                break
            mask = [int(t != IGNORE) for t in labels]
            out.append((label + (f", {turns} assistant turns" if turns > 1 else ""), _show_mask(tokenizer, ids, mask,
                                                                                                  color)))
            shown += 1
            found_multi = found_multi or turns > 1
            if found_multi or "messages" not in canonical:
                break
        else:
            if not shown:
                out.append((resolved.label, "(no convertible row in the first 200)"))
    return out


def _show_mask(tokenizer: Any, ids: list[int], mask: list[int], color: bool) -> str:
    parts, start = [], 0
    for j in range(1, len(ids) + 1):
        if j == len(ids) or mask[j] != mask[start]:
            text = tokenizer.decode(ids[start:j], skip_special_tokens=False)
            if mask[start]:
                text = f"\x1b[32m[[{text}]]\x1b[0m" if color else f"[[{text}]]"
            parts.append(text)
            start = j
    return "".join(parts)


# ---------------------------------------------------------------- the command
