"""``tunelab plan``: the memory table, the length histogram and the loss masks, as the lines it prints."""


from __future__ import annotations

import math

from tunelab.data.templates import choice_of
from tunelab.errors import Problem, UserError
from tunelab.models.load import load_tokenizer
from tunelab.plan.data import length_histograms, render_examples
from tunelab.plan.memory import FIT_FRACTION, GIB, Plan, estimate, parse_memory
from tunelab.recipe.validate import validate


def format_plan(plan: Plan) -> list[str]:
    """The estimate as text: the model line, a table of every strategy, the verdict."""
    unit, scale = ("GiB", GIB) if max(e.total for e in plan.estimates) >= GIB else ("MiB", 2**20)

    def num(x: float) -> str:
        return f"{x / scale:9.3f}"

    lines = [plan.model_line, *[f"note: {n}" for n in plan.notes], "",
             f"per-GPU memory in {unit} ({plan.gpus} GPU{'s' if plan.gpus > 1 else ''} of "
             f"{plan.gpu_memory / GIB:g} GiB; fits = at most {FIT_FRACTION:.0%} of it):",
             f"{'strategy':11s} {'weights':>9s} {'grads':>9s} {'optim':>9s} {'activ':>9s} {'other':>9s} "
             f"{'total':>9s} {'offloaded':>9s}  fits"]
    for e in plan.estimates:
        ok = "yes" if e.total <= plan.gpu_memory * FIT_FRACTION else "no"
        mark = "  <- the recipe's distributed block" if e.strategy == plan.current else ""
        lines.append(f"{e.strategy:11s} {num(e.weights)} {num(e.grads)} {num(e.optimizer)} {num(e.activations)} "
                     f"{num(e.extra)} {num(e.total)} {num(e.offloaded)}  {ok:4s}{mark}")
    lines.append("other: DDP's gradient buckets, or the largest layer's parameters gathered by ZeRO-3/FSDP2; "
                 "+cpu: offload to CPU (zero2: optimizer; zero3: + parameters; fsdp2: all three)")
    if len(plan.components) > 1:
        lines.append("models: " + "; ".join(f"{c.name} {c.weights / scale:.3f} {unit} weights"
                                            for c in plan.components))
    lines.append("")
    if plan.fits:
        base, _, off = plan.fits.partition("+")
        lines.append(f"cheapest that fits: {plan.fits} (distributed: {{strategy: {base}"
                     + (", offload: cpu" if off else "") + "})")
    else:
        lines.append("nothing fits: " + "; ".join(plan.suggestions))
    return lines


def run_plan(recipe_path: str, overrides: list[str], gpus: int = 1, gpu_memory: str = "80GB",
             seq_len: int | None = None, color: bool = False, data: bool = True) -> list[str]:
    """``tunelab plan``: the memory table, the data's length histogram and the first example's loss mask.

    It runs from the validated recipe: a recipe train would refuse is refused here, with the same problems.
    """
    if gpus < 1:
        raise UserError(Problem("--gpus", f"{gpus} GPUs", "give at least 1"))
    mem = parse_memory(gpu_memory)
    resolved = validate(recipe_path, overrides)  # every recipe error first, as train would find it
    recipe = resolved.recipe
    lines: list[str] = []
    try:
        plan = estimate(recipe, gpus, mem, seq_len, config=resolved.model_config, source=resolved.model)
        lines += format_plan(plan)
    except UserError as exc:
        lines += [f"memory: not estimated: {p}" for p in exc.problems]
        if data and resolved.model.kind not in ("builtin", "real_builtin"):
            # the tokenizer lives where the config does: don't wait for the hub a second time
            return lines + [f"data: not shown: the tokenizer of {recipe.model.path} is not available here either"]
    if not data:
        return lines

    tokenizer = load_tokenizer(recipe.model, resolved.model)
    histograms = length_histograms(recipe, tokenizer)
    if len(histograms) < len(recipe.data.train):
        lines += ["", f"data: {len(recipe.data.train) - len(histograms)} hub source(s) not read: this machine is set "
                  "offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"]
    for h in histograms:
        r = h.report
        lines += ["", f"token lengths of {h.source} ({len(h.lengths)} rows, longest {max(h.lengths, default=0)}, "
                  f"data.max_length {h.max_length}):"]
        top = max((c for _, c in h.bins()), default=1) or 1
        for label, count in h.bins():
            over = " <- over max_length" if label.startswith(">") or int(label.split("-")[0]) > h.max_length else ""
            lines.append(f"  {label:>13s} {count:6d} {'#' * math.ceil(40 * count / top)}{over}")
        verb = {"truncate": "truncated", "drop": "dropped", "error": "errors (training stops)"}[h.on_overflow]
        n_over = r.truncated + r.dropped_overflow
        lines.append(f"  on_overflow: {h.on_overflow}: {n_over} rows {verb}; {r.dropped_no_labels} dropped with "
                     f"no response tokens; {r.used} of {r.rows} rows used, {r.tokens} tokens "
                     f"({r.label_tokens} trained)")

    choice = choice_of(tokenizer)
    if choice.text:
        lines += ["", choice.describe()]
    for label, shown in render_examples(recipe, tokenizer, color):
        lines += ["", f"{label} through the chat template; tokens with loss in [[ ]]:", shown]
    return lines
