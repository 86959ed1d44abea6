"""Perplexity as a function of context length, with a sliding window over one long token stream.

As in the YaRN paper's eval: for each length L a window of exactly L tokens slides over the
text with a stride (default L: windows side by side). Only the last ``stride`` tokens of each
window are scored, so with stride < L every scored token sees at least L - stride tokens of
context; with stride = L each window scores its L - 1 predictable tokens. Perplexity is the
exponential of the token-weighted mean NLL over all windows of that length. Only full windows
are used: a text shorter than L is an error, never a silently shorter context.

Documents are tokenized without special tokens and joined with the EOS token, the way most
base models saw document boundaries in pre-training.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, Sequence

from tunelab.data.formats import BadRow, convert
from tunelab.data.sources import iter_rows, resolve_source
from tunelab.errors import DataError, Problem, UserError
from tunelab.models.logits import head_and_decoder
from tunelab.patches.rope import reset_dynamic_rope
from tunelab.specs import DataSource

TEXT_FORMATS = ("text", "messages", "sharegpt", "alpaca", "prompt_completion")


def _plain_text(canonical: dict[str, Any]) -> str:
    if "text" in canonical:
        return canonical["text"]
    if "messages" in canonical:
        return "\n".join(m["content"] for m in canonical["messages"])
    return f"{canonical['prompt']}{canonical['completion']}"


def text_token_ids(data: str, tokenizer: Any, fmt: str = "text", max_tokens: int | None = None,
                   key: str = "--data") -> list[int]:
    """The token ids of a data source's texts, EOS-separated, read only as far as ``max_tokens`` needs."""
    if fmt not in TEXT_FORMATS:
        raise UserError(Problem("--format", f"{fmt!r} cannot be read as running text", "use " + "|".join(TEXT_FORMATS)))
    src = DataSource(source=data, format=fmt)  # type: ignore[arg-type]
    resolved = resolve_source(data, key)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    rows = bad = 0
    for _, row in iter_rows(src, resolved):
        rows += 1
        try:
            text = _plain_text(convert(row, src))
        except BadRow:
            bad += 1
            continue
        if ids and eos is not None:
            ids.append(eos)
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            return ids[:max_tokens]
    if rows == 0 or rows == bad:
        raise DataError(Problem(key, f"no usable {fmt} rows in {resolved.label} ({rows} rows, {bad} bad)",
                                "pass --format to match the file; format text reads a 'text' column"))
    return ids


def _accepts_logits_to_keep(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def ppl_vs_length(model: Any, token_ids: Sequence[int], lengths: Sequence[int], stride: int | None = None,
                  label: str = "the text") -> list[dict[str, Any]]:
    """Sliding-window perplexity of ``token_ids`` at each context length, one dict per length.

    Each dict: length, stride (``min(stride or L, L)``), windows, tokens (scored), nll (mean),
    ppl. ``label`` names the text in the error raised when it is shorter than a length.
    """
    import torch
    import torch.nn.functional as F

    n = len(token_ids)
    for length in lengths:
        if length < 2:
            raise UserError(Problem("--lengths", f"context length {length} scores nothing", "use lengths of 2 or more"))
        if n < length:
            raise UserError(Problem("--lengths", f"{label} has {n} tokens, fewer than the context length {length}",
                                    "use more text (or a larger --max-tokens), or shorter --lengths"))
    if stride is not None and stride < 1:
        raise UserError(Problem("--stride", f"stride {stride}", "use a positive stride, or leave it out (= length)"))
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    keep_kw = _accepts_logits_to_keep(model)
    results = []
    for length in lengths:
        step = min(stride or length, length)
        scored = min(step, length - 1)  # the first token of a window has nothing to predict it from
        windows = (n - length) // step + 1
        total = 0.0
        with torch.no_grad():
            for w in range(windows):
                window = ids[w * step : w * step + length].unsqueeze(0).to(device)
                extra = {"logits_to_keep": scored + 1} if keep_kw else {}  # skip logits nobody scores
                logits = model(input_ids=window, use_cache=False, **extra).logits[0, -(scored + 1) : -1].float()
                total += float(F.cross_entropy(logits, window[0, -scored:], reduction="sum"))
        count = windows * scored
        nll = total / count
        results.append({"length": length, "stride": step, "windows": windows, "tokens": count, "nll": nll,
                        "ppl": math.exp(nll) if nll < 700 else math.inf})
    return results


def format_ppl_table(results: list[dict[str, Any]]) -> str:
    """Length, perplexity and scored tokens as a text table."""
    lines = [f"{'length':>8} {'ppl':>12} {'tokens':>9} {'windows':>8} {'stride':>7}"]
    for r in results:
        lines.append(f"{r['length']:>8} {r['ppl']:>12.4f} {r['tokens']:>9} {r['windows']:>8} {r['stride']:>7}")
    return "\n".join(lines)


def plot_ppl_vs_length(results_by_label: dict[str, list[dict[str, Any]]], path: str | Path,
                       trained_length: int | None = None) -> Path:
    """Perplexity against context length (log y), one line per model; a dashed line at the trained length if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, results in results_by_label.items():
        ax.plot([r["length"] for r in results], [r["ppl"] for r in results], "o-", label=label)
    if trained_length:
        ax.axvline(trained_length, color="grey", linestyle="--", linewidth=1, label=f"trained length {trained_length}")
    ax.set_xscale("log", base=2)
    ticks = sorted({r["length"] for results in results_by_label.values() for r in results})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _length_dependent_rope(model: Any) -> bool:
    """True when the model's rotary frequencies depend on the length of the forward pass (dynamic NTK)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = getattr(base.config, "rope_parameters", None) or {}
    return params.get("rope_type", params.get("type")) == "dynamic"


def _nll_by_position(model: Any, window: Any, chunk: int = 2048) -> Any:
    """NLL (float64, on CPU) of tokens 1..L-1 of a [1, L] window, the LM head applied ``chunk`` positions at a time."""
    import torch
    import torch.nn.functional as F

    parts = head_and_decoder(model)
    reset_dynamic_rope(model)  # each pass is independent: no frequencies left over from a longer one
    with torch.no_grad():
        if parts is None:
            logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
            return F.cross_entropy(logits, window[0, 1:], reduction="none").double().cpu()
        head, decoder = parts
        hidden = decoder(input_ids=window, use_cache=False).last_hidden_state[0, :-1]
        out = []
        for start in range(0, hidden.shape[0], chunk):
            logits = head(hidden[start : start + chunk]).float()
            out.append(F.cross_entropy(logits, window[0, 1 + start : 1 + start + chunk], reduction="none").double())
        return torch.cat(out).cpu()


def prefix_ppl(model: Any, documents: Sequence[Sequence[int]], lengths: Sequence[int]) -> dict[str, Any]:
    """Perplexity of the first L tokens of each document, for each L: the YaRN paper's protocol.

    Each document (at least ``max(lengths)`` tokens) is one window starting at its first token,
    and the L - 1 predictable tokens of its first L are scored, token-weighted over documents.
    For a causal model whose positions are encoded the same at every length, one forward pass
    over the longest prefix gives every length's figure; where the rotary frequencies depend on
    the length of the pass (dynamic NTK), each length gets a pass of its own, shortest first.
    Returns {"results": [one dict per length: length, documents, tokens, nll, ppl],
    "nll_by_position": the mean NLL at each position over documents (float list)}.
    """
    import torch

    longest = max(lengths)
    if any(n < 2 for n in lengths):
        raise UserError(Problem("--lengths", f"a context length below 2 in {list(lengths)}", "use lengths of 2 or more"))
    short = [i for i, d in enumerate(documents) if len(d) < longest]
    if not documents or short:
        raise UserError(Problem("--lengths", f"{len(short)} of {len(documents)} documents are shorter than {longest} "
                                "tokens", "give documents of at least the longest length"))
    model.eval()
    device = next(model.parameters()).device
    per_length = {n: 0.0 for n in lengths}
    by_position = torch.zeros(longest - 1, dtype=torch.float64)
    separate = _length_dependent_rope(model)
    for doc in documents:
        ids = torch.tensor(list(doc[:longest]), dtype=torch.long, device=device).unsqueeze(0)
        if separate:
            for n in sorted(lengths):
                nll = _nll_by_position(model, ids[:, :n])
                per_length[n] += float(nll.sum())
            by_position += nll  # the longest pass
        else:
            nll = _nll_by_position(model, ids)
            for n in lengths:
                per_length[n] += float(nll[: n - 1].sum())
            by_position += nll
    results = []
    for n in lengths:
        count = len(documents) * (n - 1)
        mean = per_length[n] / count
        results.append({"length": n, "documents": len(documents), "tokens": count, "nll": mean,
                        "ppl": math.exp(mean) if mean < 700 else math.inf})
    return {"results": results, "nll_by_position": (by_position / len(documents)).tolist()}
