"""``tunelab eval`` and ``generate``: the task drivers that load a trained model (full, adapter or run dir) and measure it."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any, Sequence

from tunelab.data.formats import BadRow, to_canonical
from tunelab.data.pipeline import encode_source
from tunelab.data.sources import iter_rows, resolve_source
from tunelab.errors import Problem, UserError
from tunelab.eval import harness
from tunelab.eval.generate import bleu, generate, rouge_l
from tunelab.eval.kv_cache import format_kv_report, kv_cache_report
from tunelab.eval.long_context import format_ppl_table, plot_ppl_vs_length, ppl_vs_length, text_token_ids
from tunelab.eval.passkey import (
    DEFAULT_MAX_NEW_TOKENS,
    format_passkey_table,
    passkey_grid,
    passkey_min_length,
    plot_passkey,
)
from tunelab.eval.perplexity import perplexity
from tunelab.eval.reward import pairwise
from tunelab.log import say
from tunelab.models.inference import inference_tokenizer, load_for_inference, load_reward_model
from tunelab.models.ref import ResolvedModel, as_resolved, resolve_model
from tunelab.runs import RunDir
from tunelab.specs import DataSource, DataSpec, LmEvalSpec


def run_eval(model_path: str, data: str, fmt: str, max_length: int, batch_size: int, limit: int | None,
             gen: dict[str, Any] | None, samples: int) -> dict[str, Any]:
    """Perplexity (and optionally generation scores) of a model on one data source."""
    src = DataSource(source=data, format=fmt)  # type: ignore[arg-type]
    spec = DataSpec(train=[src], max_length=max_length, on_overflow="truncate", on_bad_row="skip")
    model, tok = load_for_inference(resolve_model(model_path, key="MODEL"))
    rows, report = encode_source(src, "--data", tok, spec)
    if limit:
        rows = rows[:limit]
    result: dict[str, Any] = perplexity(model, rows, batch_size, tok.pad_token_id or 0, pack_tokens=max_length)
    say(f"{data}: {len(rows)} rows, {result['tokens']} scored tokens (truncated {report.truncated}, "
         f"skipped {report.skipped_bad})")
    print(f"perplexity: {result['perplexity']:.4f}")
    if gen is not None:
        hyps, refs = [], []
        for n, (_, row) in enumerate(iter_rows(src, resolve_source(data, "--data"))):
            if limit and n >= limit:
                break
            try:
                c = to_canonical(row, src)
            except BadRow:
                continue
            if "messages" in c:
                msgs = c["messages"]
                last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
                prompt, ref = msgs[:last], msgs[last]["content"]
            elif "prompt" in c:
                prompt, ref = [{"role": "user", "content": c["prompt"]}], c["completion"]
            else:
                continue
            out = generate(model, tok, prompt, **gen)
            hyps.append(out)
            refs.append(ref)
            if len(hyps) <= samples:
                print(f"--- prompt: {prompt[-1]['content']!r}\n    reference: {ref!r}\n    generated: {out!r}")
        if hyps:
            result["bleu"], result["rougeL"] = bleu(hyps, refs), rouge_l(hyps, refs)
            print(f"BLEU: {result['bleu']:.2f}  ROUGE-L: {result['rougeL']:.2f}  ({len(hyps)} generations)")
    return result


def parse_lengths(value: str | Sequence[int], key: str = "--lengths") -> list[int]:
    """Context lengths from "256,512,1024" (or a list): positive integers, else a UserError naming ``key``."""
    items = [x.strip() for x in value.split(",") if x.strip()] if isinstance(value, str) else list(value)
    out = []
    for item in items:
        try:
            n = int(item)
        except (TypeError, ValueError):
            n = 0
        if n < 1 or str(item).strip() != str(n):
            raise UserError(Problem(key, f"{item!r} is not a positive integer", "e.g. 256,512,1024"))
        out.append(n)
    if not out:
        raise UserError(Problem(key, "no lengths given", "e.g. 256,512,1024"))
    return out


def parse_depths(value: str | Sequence[float], key: str = "--depths") -> list[float]:
    """Passkey depths from "0,0.5,1" (or a list): numbers in [0, 1], else a UserError naming ``key``."""
    items = [x.strip() for x in value.split(",") if x.strip()] if isinstance(value, str) else list(value)
    out = []
    for item in items:
        try:
            d = float(item)
        except (TypeError, ValueError):
            raise UserError(Problem(key, f"{item!r} is not a number", "e.g. 0,0.25,0.5,0.75,1")) from None
        if not 0.0 <= d <= 1.0:
            raise UserError(Problem(key, f"depth {item} is outside [0, 1]", "0 = start of the filler, 1 = its end"))
        out.append(d)
    if not out:
        raise UserError(Problem(key, "no depths given", "e.g. 0,0.25,0.5,0.75,1"))
    return out


def default_eval_dir(model: ResolvedModel, task: str) -> Path:
    """Where an eval writes without --output: beside a local model (<dir>-eval-<task>), else ./eval-<task>."""
    if model.is_local:
        p = Path(model.given).expanduser().resolve()
        return p.parent / f"{p.name}-eval-{task}"
    return Path(f"eval-{task}")


def _note_beyond_trained(model: Any, lengths: list[int]) -> int | None:
    trained = getattr(model.config, "max_position_embeddings", None)
    beyond = [n for n in lengths if trained and n > trained]
    if beyond:
        say(f"note: --lengths {','.join(map(str, beyond))} go beyond the model's max_position_embeddings "
             f"({trained}): that measures extrapolation past the trained context")
    return trained


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def run_passkey_eval(model_path: str, lengths: str | Sequence[int] | None = None,
                     depths: str | Sequence[float] = "0,0.25,0.5,0.75,1.0", trials: int = 5, seed: int = 42,
                     output: str | Path | None = None, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Passkey retrieval accuracy by prompt length x depth; prints a table, writes passkey.json and passkey.png."""
    lengths_ = parse_lengths("256,512,1024" if lengths is None else lengths)
    depths_ = parse_depths(depths)
    if trials < 1:
        raise UserError(Problem("--trials", f"{trials} trials", "use at least 1"))
    source = resolve_model(model_path, key="MODEL")
    tok = inference_tokenizer(source)  # no weights yet: the checks below come first
    minimum = passkey_min_length(tok)
    if min(lengths_) < minimum:
        raise UserError(Problem("--lengths", f"{min(lengths_)} tokens cannot hold the task, the passkey sentence "
                                "and the question", f"the minimum for this tokenizer is {minimum}"))
    model, tok = load_for_inference(source)
    trained = _note_beyond_trained(model, lengths_)
    grid = passkey_grid(model, tok, lengths_, depths_, trials, seed, max_new_tokens or DEFAULT_MAX_NEW_TOKENS, log=say)
    print(format_passkey_table(grid))
    print(f"mean accuracy: {grid['mean']:.4f}  ({trials} trials per cell, seed {seed})")
    out = Path(output) if output else default_eval_dir(source, "passkey")
    _write_json(out / "passkey.json", {"model": model_path, "task": "passkey", "max_position_embeddings": trained,
                                       **grid})
    plot_passkey({model_path: grid}, out / "passkey.png")
    say(f"wrote {out / 'passkey.json'} and {out / 'passkey.png'}")
    return grid


def run_ppl_vs_length_eval(model_path: str, data: str, fmt: str = "text", lengths: str | Sequence[int] | None = None,
                           stride: int | None = None, max_tokens: int = 100_000,
                           output: str | Path | None = None) -> list[dict[str, Any]]:
    """Sliding-window perplexity at several context lengths; prints a table, writes ppl_vs_length.json and .png."""
    lengths_ = parse_lengths("128,256,512" if lengths is None else lengths)
    if stride is not None and stride < 1:
        raise UserError(Problem("--stride", f"stride {stride}", "use a positive stride, or leave it out (= length)"))
    if max_tokens < 2:
        raise UserError(Problem("--max-tokens", f"{max_tokens}", "use at least the largest of --lengths"))
    source = resolve_model(model_path, key="MODEL")
    tok = inference_tokenizer(source)  # no weights yet: the checks below come first
    ids = text_token_ids(data, tok, fmt, max_tokens)
    label = f"--data {data}" + (f" (cut to --max-tokens {max_tokens})" if len(ids) >= max_tokens else "")
    too_long = [n for n in lengths_ if n > len(ids)]
    if too_long:
        raise UserError(Problem("--lengths", f"{label} has {len(ids)} tokens, fewer than the context length "
                                f"{max(too_long)}", "use more text (or a larger --max-tokens), or shorter --lengths"))
    model, tok = load_for_inference(source)
    trained = _note_beyond_trained(model, lengths_)
    say(f"{data}: {len(ids)} tokens")
    results = ppl_vs_length(model, ids, lengths_, stride, label=label)
    print(format_ppl_table(results))
    out = Path(output) if output else default_eval_dir(source, "ppl-vs-length")
    _write_json(out / "ppl_vs_length.json", {"model": model_path, "task": "ppl-vs-length", "data": data,
                                             "format": fmt, "max_tokens": max_tokens, "text_tokens": len(ids),
                                             "max_position_embeddings": trained, "results": results})
    plot_ppl_vs_length({model_path: results}, out / "ppl_vs_length.png", trained_length=trained)
    say(f"wrote {out / 'ppl_vs_length.json'} and {out / 'ppl_vs_length.png'}")
    return results


def run_kv_cache_eval(model_path: str, lengths: str | Sequence[int] | None = None,
                      output: str | Path | None = None) -> dict[str, Any]:
    """KV-cache bytes per token, predicted (original vs MLA) and measured after generating; writes kv_cache.json."""
    lengths_ = parse_lengths("64,256" if lengths is None else lengths)
    source = resolve_model(model_path, key="MODEL")
    model, _ = load_for_inference(source)
    _note_beyond_trained(model, lengths_)
    report = kv_cache_report(model, lengths_)
    print(format_kv_report(report))
    if not report["all_match"]:
        say("note: a measured cache differs from the prediction (a sliding-window layer caps what it keeps, or "
             "the cache stores something else)")
    out = Path(output) if output else default_eval_dir(source, "kv-cache")
    _write_json(out / "kv_cache.json", {"model": model_path, "task": "kv-cache", **report})
    say(f"wrote {out / 'kv_cache.json'}")
    return report


def run_reward_eval(model_path: str, data: str, max_length: int, batch_size: int, limit: int | None) -> dict[str, Any]:
    """Pairwise accuracy and mean margin of a reward model on preference pairs."""
    src = DataSource(source=data, format="preference")
    spec = DataSpec(train=[src], max_length=max_length, on_overflow="truncate", on_bad_row="skip")
    model, tok = load_reward_model(resolve_model(model_path, key="MODEL"))
    rows, report = encode_source(src, "--data", tok, spec)
    if limit:
        rows = rows[:limit]
    result = pairwise(model, rows, batch_size, tok.pad_token_id or 0)
    say(f"{data}: {result['pairs']} pairs (truncated {report.truncated}, skipped {report.skipped_bad})")
    print(f"pairwise accuracy: {result['accuracy']:.4f}")
    print(f"mean margin r(chosen) - r(rejected): {result['margin']:+.4f}  "
          f"(mean reward chosen {result['reward_chosen']:+.4f}, rejected {result['reward_rejected']:+.4f})")
    return result


def run_generate(model_path: str, prompt: str, system: str | None, gen: dict[str, Any]) -> str:
    model, tok = load_for_inference(resolve_model(model_path, key="MODEL"))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    out = generate(model, tok, messages, **gen)
    print(out)
    return out




def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def lm_eval_scores(model_path: str | ResolvedModel, spec: LmEvalSpec, device: str = "auto",
                   output: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness tasks on a model (a run dir, its final/, an adapter: merged) and print a table.

    Writes lm_eval.json (scores, lm-eval's results and task configs) into ``output``; returns
    {task: {metric: value}}. The tasks are checked by the caller (``harness.task_problems``).
    """
    source = as_resolved(model_path)
    model_path = source.given
    model, tok = load_for_inference(source, merge=True)
    model = model.to(_device(device)).eval()
    say(f"lm-eval {importlib.metadata.version('lm_eval')}: {', '.join(spec.tasks)} on {model_path}"
        + (f" (first {spec.limit} documents of each)" if spec.limit else ""))
    results = harness.evaluate(model, tok, spec.tasks, spec.include, spec.limit, spec.batch_size, spec.num_fewshot)
    task_scores = harness.scores(results)
    print(harness.format_table(task_scores))
    if spec.limit:
        say(f"limit {spec.limit}: scores of a subset, not comparable with published ones")
    if output is not None:
        kept = ("results", "groups", "versions", "n-shot", "n-samples", "higher_is_better", "configs")
        payload: dict[str, Any] = {"model": model_path, "task": "lm-eval", **spec.model_dump(), "scores": task_scores,
                                   **{k: results[k] for k in kept if k in results}}
        path = Path(output) / "lm_eval.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        say(f"wrote {path}")
    return task_scores


def run_lm_eval(model_path: str, tasks: str, include: str | Path | None = None, limit: int | None = None,
                batch_size: int = 8, num_fewshot: int | None = None, device: str = "auto",
                output: str | Path | None = None) -> dict[str, dict[str, float]]:
    """``tunelab eval MODEL --task lm-eval:TASK[,TASK]``: check the tasks, run them, record the scores.

    Everything is checked before the weights load. A run dir (or its final/) gets the scores in its
    summary.json under ``lm_eval`` (beside those of earlier tasks).
    """
    names = harness.parse_tasks(tasks)
    if batch_size < 1:
        raise UserError(Problem("--batch-size", f"{batch_size}", "use at least 1"))
    if limit is not None and limit < 1:
        raise UserError(Problem("--limit", f"{limit}", "use at least 1, or leave it out (every document)"))
    if problems := harness.task_problems(names, include, "--task", "--lm-eval-include", numbered=False):
        raise UserError(problems)
    spec = LmEvalSpec(tasks=names, include=str(include) if include is not None else None, limit=limit,
                      batch_size=batch_size, num_fewshot=num_fewshot)
    source = resolve_model(model_path, key="MODEL")
    out = Path(output) if output else default_eval_dir(source, "lm-eval")
    task_scores = lm_eval_scores(source, spec, device, out)
    run = RunDir.of_model(model_path)
    if run is not None:
        run.update_summary("lm_eval", task_scores)
        say(f"added the scores to {run.summary} (lm_eval)")
    return task_scores
