"""Run the real-model task recipes and print what each method did on held-out data, before -> after.

    python scripts/real_quality.py                      # all recipes, one after another
    python scripts/real_quality.py persona-sft-lora arith-dpo
    python scripts/real_quality.py --quick              # 2 steps each, few eval rows: a CI-sized check
    python scripts/real_quality.py --out runs/real-quality --reuse   # re-measure finished runs, no retraining

Each recipe is recipes/real/<name>.yaml, trained with ``tunelab train`` in a child process
(``OMP_NUM_THREADS=1``) into ``<out>/runs/<name>`` (removed first unless ``--reuse``). Then, per method:

- sft: greedy answers (chat template + generation prompt, batched, left padding, ``--max-new-tokens``)
  of the base model and of the trained ``final/`` on the held-out persona prompts: the share in the
  persona format (starts "Ahoy!", ends "Over and out."), the share that stop by themselves at
  ``<|im_end|>`` within the budget, and the held-out perplexity the run printed;
- reward: held-out pairwise accuracy, new head -> trained (the run's report);
- dpo (DPO, IPO): the run's implicit-reward accuracy and margin against the start, and the share of
  held-out pairs with log π(chosen) > log π(rejected) (summed and per token), start -> trained;
- grpo, ppo: held-out greedy and sampled accuracy of the reward (`numeric`) before -> after (the
  run's report), training reward first -> last 10% of steps, KL to the reference when logged,
  seconds per step; the reward curve as <out>/plots/<name>-reward.png.

Writes <out>/results.json, <out>/table.md (one markdown row per run) and <out>/logs/<name>.log.
CPU seconds are the child's user + system time (training, with its own held-out evaluation);
the script's own generation pass is counted separately (``eval CPU s``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes/real"
BASE_MODEL = "builtin:smollm2-135m-instruct"
ALL = ["persona-sft-lora", "persona-sft-full", "arith-reward", "arith-dpo", "arith-ipo", "arith-grpo", "arith-ppo"]
PERSONA_START, PERSONA_END = "Ahoy!", "Over and out."
IM_END = "<|im_end|>"

# --quick: a couple of steps and a handful of held-out rows per method (checks the chain, not the quality)
QUICK = {
    "common": ["train.max_steps=2", "train.logging_steps=1", "train.save_steps=1000"],
    "sft": ["data.eval.0.samples=8"],
    "reward": ["data.eval.0.samples=8"],
    "dpo": ["data.eval.0.samples=8"],
    "grpo": ["data.eval.0.samples=4", "method.eval_samples=1", "method.max_completion_length=16"],
    "ppo": ["data.eval.0.samples=4", "method.eval_samples=1", "method.max_completion_length=16"],
}


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_recipe(name: str, overrides: list[str] | None = None) -> Any:
    sys.path.insert(0, str(ROOT / "src"))
    from tunelab.recipe.load import load_recipe as _load

    return _load(RECIPES / f"{name}.yaml", overrides or []).recipe


# ---- training ---------------------------------------------------------------------------------------


def train(name: str, run_dir: Path, overrides: list[str], log_path: Path) -> dict[str, Any]:
    """``tunelab train`` in a child process; its CPU and wall seconds and the times of its step lines."""
    cmd = [sys.executable, "-m", "tunelab", "train", str(RECIPES / f"{name}.yaml"),
           "--set", f"train.output_dir={run_dir}", "--set", "train.report_to=[none]"]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    printable = " ".join(cmd[1:]).replace(sys.executable, "python")
    print(f"[real-quality] {name}: OMP_NUM_THREADS=1 python {printable}", flush=True)
    cpu0, t0 = child_cpu(), time.monotonic()
    step_times: list[tuple[int, float]] = []
    tail: list[str] = []
    with log_path.open("w", encoding="utf-8") as log:
        log.write("$ OMP_NUM_THREADS=1 python " + printable + "\n")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.monotonic() - t0
            log.write(f"[{now:8.1f}s] {line}")
            m = re.search(r"ppo step (\d+)/(\d+)", line)
            if m:
                step_times.append((int(m.group(1)), now))
            if line.startswith("[tunelab]") and "%|" not in line:
                print("   ", line.rstrip()[:200], flush=True)
            tail = (tail + [line])[-40:]
        rc = proc.wait()
    return {"command": "OMP_NUM_THREADS=1 python " + printable, "returncode": rc, "cpu_s": child_cpu() - cpu0,
            "wall_s": time.monotonic() - t0, "step_times": step_times, "log": str(log_path),
            "tail": "".join(tail)[-3000:] if rc else ""}


# ---- generation ---------------------------------------------------------------------------------------


_BASE: dict[str, Any] = {}


def base_model() -> tuple[Any, Any]:
    if "model" not in _BASE:
        from tunelab.models.inference import load_for_inference

        _BASE["model"], _BASE["tok"] = load_for_inference(BASE_MODEL)
    return _BASE["model"], _BASE["tok"]


def trained_model(run_dir: Path) -> tuple[Any, Any]:
    """The run's final/: a LoRA adapter goes onto a copy of the cached base, a full model loads as saved."""
    import copy

    from tunelab.models.inference import inference_tokenizer, load_for_inference

    final = run_dir / "final"
    cfg = final / "adapter_config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("base_model_name_or_path") == BASE_MODEL:
        from peft import PeftModel

        base, _ = base_model()
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(final))
        return model, inference_tokenizer(str(final))
    return load_for_inference(str(final))


def eval_conversations(recipe: Any, limit: int | None) -> list[list[dict[str, str]]]:
    """The held-out rows as (prompt messages + reference assistant message), as the run read them."""
    from tunelab.data.formats import convert
    from tunelab.data.sources import iter_rows, resolve_source

    src = recipe.data.eval[0]
    rows = [convert(row, src)["messages"] for _, row in iter_rows(src, resolve_source(src.source, "eval"))]
    return rows[:limit] if limit else rows


def greedy(model: Any, tok: Any, prompts: list[list[dict[str, str]]], max_new_tokens: int,
           batch_size: int = 20) -> list[dict[str, Any]]:
    """Greedy replies: text up to the first <|im_end|>, and whether it came within the budget."""
    import torch

    end_id = tok.convert_tokens_to_ids(IM_END)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    model.eval()
    out: list[dict[str, Any]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for m in chunk]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=end_id, pad_token_id=pad)
        for row in gen[:, width:].tolist():
            stopped = end_id in row
            body = row[: row.index(end_id)] if stopped else row
            text = tok.decode(body, skip_special_tokens=True).strip()
            out.append({"text": text, "stopped": stopped, "tokens": len(body) + int(stopped)})
    return out


def persona_figures(replies: list[dict[str, Any]], refs: list[str]) -> dict[str, Any]:
    n = max(len(replies), 1)
    fmt = [r["text"].startswith(PERSONA_START) and r["text"].endswith(PERSONA_END) for r in replies]
    return {"n": len(replies), "format": sum(fmt) / n, "start_marker": sum(r["text"].startswith(PERSONA_START)
                                                                         for r in replies) / n,
            "end_marker": sum(r["text"].endswith(PERSONA_END) for r in replies) / n,
            "stopped": sum(r["stopped"] for r in replies) / n,
            "format_and_stopped": sum(f and r["stopped"] for f, r in zip(fmt, replies)) / n,
            "exact_reference": sum(r["text"] == ref.strip() for r, ref in zip(replies, refs)) / n,
            "examples": [r["text"] for r in replies[:4]]}


def sft_eval(recipe: Any, run_dir: Path, limit: int | None, max_new_tokens: int, cache: dict) -> dict[str, Any]:
    convs = eval_conversations(recipe, limit)
    prompts = [c[:-1] for c in convs]
    refs = [c[-1]["content"] for c in convs]
    key = (recipe.data.eval[0].source, limit, max_new_tokens)
    if key not in cache:
        model, tok = base_model()
        cache[key] = persona_figures(greedy(model, tok, prompts, max_new_tokens), refs)
    model, tok = trained_model(run_dir)
    after = persona_figures(greedy(model, tok, prompts, max_new_tokens), refs)
    del model
    return {"before": cache[key], "after": after}


# ---- per-method figures ----------------------------------------------------------------------------


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def arrow(a: float | None, b: float | None, f: Any = pct) -> str:
    return f"{f(a)} → {f(b)}"


def mean_last(metrics: list[dict[str, Any]], key: str) -> tuple[float | None, float | None]:
    """Mean of a logged training metric over the first and last 10% of its logged steps."""
    vals = [m[key] for m in metrics if key in m and isinstance(m[key], (int, float))]
    if not vals:
        return None, None
    k = max(1, len(vals) // 10)
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


def seconds_per_step(metrics: list[dict[str, Any]], summary: dict[str, Any], step_times: list) -> float | None:
    timed = [m["step_time"] for m in metrics if isinstance(m.get("step_time"), (int, float))]
    if timed:  # TRL's GRPO logs each step's time
        return sum(timed) / len(timed)
    runtime = next((m["train_runtime"] for m in reversed(metrics) if "train_runtime" in m), None)
    if runtime and summary.get("global_step"):
        return runtime / summary["global_step"]
    if len(step_times) >= 2:  # our PPO trainer prints one line per logged step
        (s0, t0), (s1, t1) = step_times[0], step_times[-1]
        return (t1 - t0) / (s1 - s0) if s1 > s0 else None
    return None


def preference_shares(ev: dict[str, Any], pairs: list[tuple[int, int]] | None) -> dict[str, float]:
    """Share of pairs with log π(chosen) > log π(rejected): summed, and per response token when lengths are known."""
    c, r = ev["logp_chosen"], ev["logp_rejected"]
    out = {"summed": sum(a > b for a, b in zip(c, r)) / max(len(c), 1)}
    if pairs and len(pairs) == len(c):
        out["per_token"] = sum(a / lc > b / lr for a, b, (lc, lr) in zip(c, r, pairs)) / max(len(c), 1)
    return out


def pair_lengths(recipe: Any, n: int) -> list[tuple[int, int]] | None:
    """Token counts of chosen / rejected in the held-out pairs (for per-token shares); None if they do not line up."""
    try:
        from tunelab.data.pipeline import encode_source
        from tunelab.models.inference import inference_tokenizer

        tok = inference_tokenizer(BASE_MODEL)
        rows, _ = encode_source(recipe.data.eval[0], "eval", tok, recipe.data)
        if len(rows) != n:
            return None
        return [(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
    except Exception:  # noqa: BLE001 - the per-token share is an extra; the summed one stands alone
        return None


def plot_reward(name: str, metrics: list[dict[str, Any]], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pts = [(m["step"], m["reward"]) for m in metrics if "reward" in m]
    if not pts:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(*zip(*pts), "o-", ms=3, label="train reward (mean per step)")
    k = max(1, len(pts) // 5)
    if len(pts) > k:
        smooth = [(pts[i][0], sum(p[1] for p in pts[max(0, i - k + 1):i + 1]) / len(pts[max(0, i - k + 1):i + 1]))
                  for i in range(len(pts))]
        ax.plot(*zip(*smooth), "-", lw=2, label=f"running mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    kls = [(m["step"], m["kl"]) for m in metrics if "kl" in m]
    if kls and any(v for _, v in kls):
        ax2 = ax.twinx()
        ax2.plot(*zip(*kls), "--", color="grey", label="KL to reference")
        ax2.set_ylabel("KL", color="grey")
    ax.set_title(name)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def figures(name: str, recipe: Any, run_dir: Path, trained: dict[str, Any], args: Any, cache: dict,
            out: Path) -> tuple[dict[str, Any], str]:
    """(figures, the table's figure text) of one finished run."""
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    method = recipe.method.name
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    fig: dict[str, Any] = {"method": method, "steps": summary.get("global_step"),
                           "sec_per_step": seconds_per_step(metrics, summary, trained.get("step_times", []))}
    if method == "sft":
        cpu0 = self_cpu()
        gen = sft_eval(recipe, run_dir, args.limit, args.max_new_tokens, cache)
        fig["eval_cpu_s"] = self_cpu() - cpu0
        fig.update(generation=gen, perplexity={"before": before.get("perplexity"), "after": after.get("perplexity")})
        b, a = gen["before"], gen["after"]
        text = (f"persona format {arrow(b['format'], a['format'])}; stops at {IM_END} within {args.max_new_tokens} "
                f"tokens {arrow(b['stopped'], a['stopped'])}; both {arrow(b['format_and_stopped'], a['format_and_stopped'])}; "
                f"exact reference {arrow(b['exact_reference'], a['exact_reference'])}; perplexity "
                f"{arrow(before.get('perplexity'), after.get('perplexity'), lambda x: 'n/a' if x is None else f'{x:.3f}')}"
                f" ({a['n']} prompts)")
    elif method == "reward":
        fig["pairwise_accuracy"] = {"before": before.get("accuracy"), "after": after.get("accuracy")}
        fig["margin"] = {"before": before.get("margin"), "after": after.get("margin")}
        text = (f"pairwise accuracy {arrow(before.get('accuracy'), after.get('accuracy'))}; margin "
                f"{before.get('margin', float('nan')):+.3f} → {after.get('margin', float('nan')):+.3f} "
                f"({after.get('pairs')} pairs)")
    elif method == "dpo":
        lengths = pair_lengths(recipe, after.get("pairs", 0))
        pb, pa = preference_shares(before, lengths), preference_shares(after, lengths)
        fig.update(implicit_reward_accuracy=summary.get("implicit_reward_accuracy"),
                   implicit_reward_margin=summary.get("implicit_reward_margin"),
                   mean_logratio={"before": summary.get("mean_logratio_before"), "after": summary.get("mean_logratio_after")},
                   likelihood_preference={"before": pb, "after": pa})
        text = (f"implicit-reward accuracy {pct(summary.get('implicit_reward_accuracy'))}, margin "
                f"{summary.get('implicit_reward_margin', float('nan')):+.3f}; log π(chosen) > log π(rejected) "
                f"{arrow(pb['summed'], pa['summed'])}"
                + (f" (per token {arrow(pb['per_token'], pa['per_token'])})" if "per_token" in pa else "")
                + f"; mean log-ratio {summary.get('mean_logratio_before', float('nan')):+.2f} → "
                f"{summary.get('mean_logratio_after', float('nan')):+.2f} ({after.get('pairs')} pairs)")
    else:  # grpo, ppo
        rname = recipe.method.rewards[0].label
        acc = {mode: {"before": (before.get(mode) or {}).get(rname), "after": (after.get(mode) or {}).get(rname)}
               for mode in ("greedy", "sampled")}
        first, last = mean_last(metrics, "reward")
        kl_first, kl_last = mean_last(metrics, "kl")
        plot = plot_reward(name, metrics, out / "plots" / f"{name}-reward.png")
        fig.update(accuracy=acc, train_reward={"first": first, "last": last}, kl={"first": kl_first, "last": kl_last},
                   plot=plot or "skipped (matplotlib missing or no reward logged)")
        f3 = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        text = (f"greedy {rname} {arrow(acc['greedy']['before'], acc['greedy']['after'])}; sampled "
                f"(T={recipe.method.temperature}, {recipe.method.eval_samples}/prompt) "
                f"{arrow(acc['sampled']['before'], acc['sampled']['after'])}; train reward {arrow(first, last, f3)}"
                + (f"; KL {arrow(kl_first, kl_last, f3)}" if kl_last is not None else "; KL not logged (beta 0)")
                + f" ({after.get('prompts')} prompts)")
    sps = fig["sec_per_step"]
    if sps:
        text += f"; {sps:.1f} s/step"
    return fig, text


# ---- main -------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help=f"recipes/real/<name>.yaml to run (default: {' '.join(ALL)})")
    ap.add_argument("--quick", action="store_true", help="2 steps and a few held-out rows per recipe")
    ap.add_argument("--out", default=None, help="results folder (default runs/real-quality, runs/real-quality-quick)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra override for every run")
    ap.add_argument("--reuse", action="store_true", help="measure finished runs in <out>/runs again, do not retrain")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--limit", type=int, default=None, help="held-out prompts for the SFT generation pass")
    args = ap.parse_args()
    names = args.names or ALL
    unknown = [n for n in names if not (RECIPES / f"{n}.yaml").is_file()]
    if unknown:
        ap.error(f"no recipes/real/{unknown[0]}.yaml")
    out = Path(args.out or ("runs/real-quality-quick" if args.quick else "runs/real-quality"))
    if not out.is_absolute():
        out = ROOT / out
    if args.quick and args.limit is None:
        args.limit = 8
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "src"))
    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    cache: dict = {}
    rows = []
    for name in names:
        method = load_recipe(name).method.name
        run_dir = out / "runs" / name
        overrides = list(args.sets)
        if args.quick:
            overrides = QUICK["common"] + QUICK[method] + overrides
        recipe = load_recipe(name, overrides)
        done = (run_dir / "summary.json").is_file() and (run_dir / "final").is_dir()
        if args.reuse and done and name in results and "train" in results[name]:
            trained = results[name]["train"]
            print(f"[real-quality] {name}: reusing {run_dir}", flush=True)
        else:
            if run_dir.exists():
                shutil.rmtree(run_dir)
            trained = train(name, run_dir, overrides, out / "logs" / f"{name}.log")
        entry: dict[str, Any] = {"recipe": f"recipes/real/{name}.yaml", "quick": args.quick, "overrides": overrides,
                                 "train": trained}
        if trained["returncode"] != 0:
            print(f"[real-quality] {name} FAILED (exit {trained['returncode']}); last lines:\n{trained['tail']}",
                  flush=True)
            text = f"FAILED (exit {trained['returncode']}), see {trained['log']}"
        else:
            fig, text = figures(name, recipe, run_dir, trained, args, cache, out)
            entry["figures"] = fig
        entry["row"] = (f"| {name} | {method} | {text} | {entry.get('figures', {}).get('steps', '?')} | "
                        f"{trained['cpu_s']:.0f} | {trained['wall_s']:.0f} | "
                        f"{entry.get('figures', {}).get('eval_cpu_s', 0):.0f} |")
        results[name] = entry
        rows.append(entry["row"])
        print(entry["row"], flush=True)
        out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    header = ["| run | method | held-out figures, before → after | steps | train CPU s | train wall s | eval CPU s |",
              "|---|---|---|---|---|---|---|"]
    table = "\n".join(header + [results[n]["row"] for n in ALL + sorted(set(results) - set(ALL)) if n in results])
    (out / "table.md").write_text(table + "\n")
    print("\n" + "\n".join(header + rows))
    print(f"\n[real-quality] wrote {results_path}, {out / 'table.md'}" + (f", {out / 'plots'}" if (out / "plots").is_dir()
                                                                          else ""))
    return 0 if all(results[n]["train"]["returncode"] == 0 for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
