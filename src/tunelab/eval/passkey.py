"""Passkey retrieval: can the model recall a number hidden at some depth of a long, dull prompt?

The test of Mohtashami & Jaggi (landmark attention), as used by the YaRN paper's eval: a task
description, filler sentences repeated, "The pass key is NNNNN. Remember it. NNNNN is the
pass key." inserted at a depth (0 = right after the description, 1 = right before the
question), and "What is the pass key? The pass key is" at the end. The model is used as a
base LM (plain text, no chat template), generates a few tokens greedily, and a trial counts
as correct when the passkey appears as a whole number in what it wrote.

Unlike the original, which sizes the filler in characters, the filler here is sized with the
model's own tokenizer: the tokenized prompt is the longest whole-sentence prompt that does
not exceed the requested length, so "length 4096" means 4096 tokens for every model.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from tunelab.errors import Problem, UserError
from tunelab.patches.rope import reset_dynamic_rope

TASK_DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                    "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
QUESTION = "What is the pass key? The pass key is"
PASSKEY_RANGE = (10000, 99999)  # five digits, so every passkey sentence has the same length in characters
DEFAULT_MAX_NEW_TOKENS = 10
_PROBE_SENTENCES = 100  # a multiple of len(FILLER): used to estimate tokens per filler sentence


def needle(passkey: int) -> str:
    """The sentence that hides the passkey."""
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key."


def _filler(start: int, stop: int) -> str:
    return " ".join(FILLER[i % len(FILLER)] for i in range(start, stop))


def _split_at_depth(n: int, depth: float) -> int:
    """How many of ``n`` filler sentences precede the needle: the split whose character share is closest to depth."""
    sizes = [len(FILLER[i % len(FILLER)]) for i in range(n)]
    total = sum(sizes) + max(n - 1, 0)  # the sentences and the spaces between them
    best, best_err, before = 0, abs(depth), 0
    for k in range(1, n + 1):
        before += sizes[k - 1] + (k > 1)
        after = total - before - (k < n)
        err = abs(before / (before + after) - depth)
        if err < best_err:
            best, best_err = k, err
    return best


def _assemble(n: int, depth: float, passkey: int) -> str:
    before = _split_at_depth(n, depth)
    parts = [TASK_DESCRIPTION, _filler(0, before), needle(passkey), _filler(before, n), QUESTION]
    return "\n".join(p for p in parts if p)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: prompts longer than tokenizer.model_max_length are the point here, not a mistake
    return list(tokenizer(text, verbose=False)["input_ids"])


def passkey_min_length(tokenizer: Any) -> int:
    """Tokens in a prompt with no filler at all: the shortest length that can hold description, passkey and question."""
    lo, hi = PASSKEY_RANGE
    return max(len(_encode(tokenizer, _assemble(0, 0.0, key))) for key in (lo, hi, 12345, 54321, 67890, 88888))


def passkey_prompt(tokenizer: Any, length: int, depth: float, passkey: int) -> tuple[str, list[int]]:
    """(text, token ids) of the longest prompt of whole filler sentences that tokenizes to at most ``length`` tokens.

    The filler sentence count is estimated from the tokens per sentence, then moved one
    sentence at a time until the prompt fits and one more sentence would not: a few
    tokenizations even at 100k tokens, and exact for any tokenizer.
    """
    if not 0.0 <= depth <= 1.0:
        raise UserError(Problem("--depths", f"depth {depth} is outside [0, 1]", "0 = start of the filler, 1 = its end"))
    tokens = lambda n: len(_encode(tokenizer, _assemble(n, depth, passkey)))  # noqa: E731
    base = tokens(0)
    if base > length:
        raise UserError(Problem("--lengths", f"{length} tokens cannot hold the passkey prompt",
                                f"the minimum for this tokenizer is {base} tokens"))
    per_sentence = max((tokens(_PROBE_SENTENCES) - base) / _PROBE_SENTENCES, 1e-6)
    n = max(int((length - base) / per_sentence), 0)
    while n > 0 and tokens(n) > length:
        n -= 1
    while tokens(n + 1) <= length:
        n += 1
    text = _assemble(n, depth, passkey)
    return text, _encode(tokenizer, text)


def passkey_found(answer: str, passkey: int) -> bool:
    """True when the passkey appears as a whole number in the generated text."""
    return str(passkey) in re.findall(r"\d+", answer)


def greedy_continue(model: Any, input_ids: list[int], max_new_tokens: int, pad_token_id: int | None) -> list[int]:
    """The ids a model appends to ``input_ids`` under greedy decoding (batch of one, on the model's device)."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    reset_dynamic_rope(model)  # each trial is independent: no frequencies left over from a longer one
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad_token_id)
    return out[0, ids.shape[1] :].tolist()


def passkey_grid(model: Any, tokenizer: Any, lengths: Sequence[int], depths: Sequence[float], trials: int = 5,
                 seed: int = 42, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Passkey accuracy for every (length, depth) cell over ``trials`` seeded passkeys.

    Returns ``accuracy[i][j]`` for ``lengths[i]`` x ``depths[j]``, ``mean_by_length``, ``mean``,
    and every trial in ``cases`` (passkey, prompt tokens, generated answer, correct).
    """
    if trials < 1:
        raise UserError(Problem("--trials", f"{trials} trials", "use at least 1"))
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    accuracy: list[list[float]] = []
    cases: list[dict[str, Any]] = []
    for length in lengths:
        row = []
        for depth in depths:
            correct = 0
            for trial in range(trials):
                passkey = rng.randint(*PASSKEY_RANGE)
                _, ids = passkey_prompt(tokenizer, length, depth, passkey)
                answer = tokenizer.decode(greedy_continue(model, ids, max_new_tokens, pad), skip_special_tokens=True)
                ok = passkey_found(answer, passkey)
                correct += ok
                cases.append({"length": length, "depth": depth, "trial": trial, "passkey": passkey,
                              "prompt_tokens": len(ids), "answer": answer, "correct": ok})
            row.append(correct / trials)
        accuracy.append(row)
        if log:
            log(f"passkey length {length}: mean accuracy {sum(row) / len(row):.2f}")
    means = [sum(r) / len(r) for r in accuracy]
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "seed": seed,
            "max_new_tokens": max_new_tokens, "accuracy": accuracy, "mean_by_length": means,
            "mean": sum(means) / len(means) if means else 0.0, "cases": cases}


def format_passkey_table(grid: dict[str, Any]) -> str:
    """The accuracy grid as a text table: one row per length, one column per depth, then the row mean."""
    head = f"{'length':>8} " + " ".join(f"{'d=' + format(d, 'g'):>7}" for d in grid["depths"]) + f" {'mean':>7}"
    lines = [head]
    for length, row, mean in zip(grid["lengths"], grid["accuracy"], grid["mean_by_length"]):
        lines.append(f"{length:>8} " + " ".join(f"{a:>7.2f}" for a in row) + f" {mean:>7.2f}")
    return "\n".join(lines)


def plot_passkey(grids_by_label: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Heatmaps of passkey accuracy (depth x length), one panel per model, on one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = max(len(grids_by_label), 1)
    widest = max((len(g["lengths"]) for g in grids_by_label.values()), default=1)
    fig, axes = plt.subplots(1, n, figsize=(1.0 + (1.2 + 0.7 * widest) * n, 4), dpi=100, squeeze=False)
    image = None
    for ax, (label, grid) in zip(axes[0], grids_by_label.items()):
        acc = [[grid["accuracy"][i][j] for i in range(len(grid["lengths"]))] for j in range(len(grid["depths"]))]
        image = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        for j, row in enumerate(acc):
            for i, a in enumerate(row):
                ax.text(i, j, f"{a:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(grid["lengths"])), [str(x) for x in grid["lengths"]], rotation=45)
        ax.set_yticks(range(len(grid["depths"])), [format(d, "g") for d in grid["depths"]])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("passkey depth")
        ax.set_title(f"{label} (mean {grid['mean']:.2f})", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
