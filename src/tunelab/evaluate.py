"""``tunelab eval``, ``generate`` and ``merge``: load a trained model (full, adapter or run dir) and use it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.errors import Problem, UserError


def _say(msg: str) -> None:
    print(f"[tunelab] {msg}", flush=True)


def resolve_model_dir(path: str) -> str:
    """A run dir means its final/; anything else is used as given."""
    p = Path(path)
    if (p / "final").is_dir() and not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        return str(p / "final")
    return path


def inference_tokenizer(path: str) -> Any:
    """The tokenizer saved with a model (the bundled one for built-in bases), with a pad token."""
    from transformers import AutoTokenizer

    from tunelab.models.builtin import builtin_tokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tok = builtin_tokenizer()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_for_inference(path: str, merge: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) from a full model dir, a PEFT adapter dir, a run dir, or builtin:tiny-*."""
    from transformers import AutoModelForCausalLM

    from tunelab.models.builtin import builtin_model, builtin_tokenizer

    if path.startswith("builtin:"):
        from tunelab.models.builtin import BUILTIN_MODELS

        name = path[len("builtin:") :]
        if name not in BUILTIN_MODELS:
            raise UserError(Problem("MODEL", f"unknown built-in model {path!r}", "known: " + ", ".join(BUILTIN_MODELS)))
        return builtin_model(name), builtin_tokenizer()
    path = resolve_model_dir(path)
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        from peft import PeftModel

        cfg = json.loads((p / "adapter_config.json").read_text())
        base_path = cfg.get("base_model_name_or_path") or ""
        if base_path.startswith("builtin:"):
            base = builtin_model(base_path[len("builtin:") :])
        else:
            base = AutoModelForCausalLM.from_pretrained(base_path, use_safetensors=True)
        model = PeftModel.from_pretrained(base, path)
        if merge:
            model = model.merge_and_unload()
    elif p.is_dir() and (p / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    elif p.exists():
        raise UserError(Problem("MODEL", f"{path} holds neither a model (config.json) nor an adapter"))
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
        except OSError as exc:
            raise UserError(Problem("MODEL", f"cannot load {path!r}: {exc}"[:400])) from None
    return model, inference_tokenizer(path)


def run_eval(model_path: str, data: str, fmt: str, max_length: int, batch_size: int, limit: int | None,
             gen: dict[str, Any] | None, samples: int) -> dict[str, Any]:
    """Perplexity (and optionally generation scores) of a model on one data source."""
    from tunelab.data.formats import BadRow, to_canonical
    from tunelab.data.pipeline import encode_source
    from tunelab.data.sources import iter_rows, resolve_source
    from tunelab.eval.generate import bleu, generate, rouge_l
    from tunelab.eval.perplexity import perplexity
    from tunelab.recipe.schema import DataSource, DataSpec

    src = DataSource(source=data, format=fmt)  # type: ignore[arg-type]
    spec = DataSpec(train=[src], max_length=max_length, on_overflow="truncate", on_bad_row="skip")
    model, tok = load_for_inference(model_path)
    rows, report = encode_source(src, "--data", tok, spec)
    if limit:
        rows = rows[:limit]
    result: dict[str, Any] = perplexity(model, rows, batch_size, tok.pad_token_id or 0)
    _say(f"{data}: {len(rows)} rows, {result['tokens']} scored tokens (truncated {report.truncated}, "
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


def load_reward_model(path: str) -> tuple[Any, Any]:
    """(reward model, tokenizer) from a reward run dir, its final/, or a reward LoRA adapter dir."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_dir(path)
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        from peft import PeftModel

        cfg = json.loads((p / "adapter_config.json").read_text())
        if cfg.get("task_type") != "SEQ_CLS":
            raise UserError(Problem("MODEL", f"{path} is a {cfg.get('task_type')} adapter, not a reward model"))
        base = AutoModelForSequenceClassification.from_pretrained(cfg["base_model_name_or_path"], num_labels=1,
                                                                  use_safetensors=True)
        model = PeftModel.from_pretrained(base, path)
    elif (p / "config.json").is_file():
        cfg = json.loads((p / "config.json").read_text())
        if not any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or []):
            raise UserError(Problem("MODEL", f"{path} is not a reward model ({', '.join(cfg.get('architectures') or [])})",
                                    "train one with method: reward"))
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
    else:
        raise UserError(Problem("MODEL", f"{path} holds neither a model (config.json) nor an adapter"))
    tok = inference_tokenizer(path)
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def run_reward_eval(model_path: str, data: str, max_length: int, batch_size: int, limit: int | None) -> dict[str, Any]:
    """Pairwise accuracy and mean margin of a reward model on preference pairs."""
    from tunelab.data.pipeline import encode_source
    from tunelab.methods.reward import pairwise
    from tunelab.recipe.schema import DataSource, DataSpec

    src = DataSource(source=data, format="preference")
    spec = DataSpec(train=[src], max_length=max_length, on_overflow="truncate", on_bad_row="skip")
    model, tok = load_reward_model(model_path)
    rows, report = encode_source(src, "--data", tok, spec)
    if limit:
        rows = rows[:limit]
    result = pairwise(model, rows, batch_size, tok.pad_token_id or 0)
    _say(f"{data}: {result['pairs']} pairs (truncated {report.truncated}, skipped {report.skipped_bad})")
    print(f"pairwise accuracy: {result['accuracy']:.4f}")
    print(f"mean margin r(chosen) - r(rejected): {result['margin']:+.4f}  "
          f"(mean reward chosen {result['reward_chosen']:+.4f}, rejected {result['reward_rejected']:+.4f})")
    return result


def run_generate(model_path: str, prompt: str, system: str | None, gen: dict[str, Any]) -> str:
    from tunelab.eval.generate import generate

    model, tok = load_for_inference(model_path)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    out = generate(model, tok, messages, **gen)
    print(out)
    return out


def run_merge(source: str, output: Path) -> Path:
    """Merge a LoRA/DoRA adapter into its base weights and save model + tokenizer to ``output``."""
    path = resolve_model_dir(source)
    if not (Path(path) / "adapter_config.json").is_file():
        raise UserError(Problem("SOURCE", f"{source} is not a PEFT adapter (no adapter_config.json)",
                                "merge takes a LoRA/DoRA run dir or adapter dir"))
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise UserError(Problem("SOURCE", f"{cfg.get('peft_type')} adapters cannot be merged into weights",
                                "only LoRA/DoRA/QLoRA adapters merge; prefix/prompt tuning stay adapters"))
    model, tok = load_for_inference(path, merge=True)
    if output.exists() and any(output.iterdir()):
        raise UserError(Problem("--output", f"{output} exists and is not empty"))
    model.save_pretrained(output)
    tok.save_pretrained(output)
    _say(f"merged {source} -> {output}")
    return output
