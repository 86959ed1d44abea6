"""SFT throughput: tunelab against a plain TRL SFTTrainer script with TRL's defaults.

One run, same tiny model (builtin:tiny-llama, same seeded init), same bundled chat data with a
realistic length spread, same examples, one epoch each. Each side runs in its own subprocess
so its peak memory (max RSS on CPU, max allocated on CUDA) is its own. Printed: real (non-pad)
tokens/s of each side, the ratio, and peak memory.

    python scripts/bench_sft.py [--rows 1200] [--epochs 1] [--set data.max_length=512 ...]

What differs is only what each side does by default: TRL pads each batch of 8 to its longest
row, turns on gradient checkpointing and bf16 autocast, and computes the loss with its chunked
fused LM head; tunelab packs rows best-fit into rows of max_length (one padded row each, no
cross-example attention), uses fp32 on CPU without checkpointing for a model that fits, and
computes the loss from the plain logits when they are small. Extra `--set key=value` overrides
apply to the tunelab side's recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = "builtin:quickstart/sft"


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_loss(trainer) -> float:
    """The epoch's mean training loss as the Trainer reports it."""
    return next(h["train_loss"] for h in reversed(trainer.state.log_history) if "train_loss" in h)


def rows(n: int) -> list[dict]:
    from tunelab.data.sources import iter_rows, resolve_source
    from tunelab.recipe.schema import DataSource

    src = DataSource(source=DATA, format="messages")
    return [r for _, r in iter_rows(src, resolve_source(DATA, "data"), limit=n)]


def side_trl(n: int, epochs: float, out: str) -> dict:
    """A plain TRL script: SFTTrainer with TRL's defaults on the conversational dataset."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tunelab.models.builtin import builtin_model, builtin_tokenizer

    tok = builtin_tokenizer()
    model = builtin_model("tiny-llama")
    ds = Dataset.from_list([{"messages": r["messages"]} for r in rows(n)])
    import torch

    # TRL's defaults; on a CPU, TRL's bf16 default refuses to start unless use_cpu=True (its own error says so)
    args = SFTConfig(output_dir=out, num_train_epochs=epochs, report_to="none", save_strategy="no",
                     assistant_only_loss=True, disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"]) * epochs
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "steps": trainer.state.global_step, "train_loss": train_loss(trainer),
            "config": {"bf16": args.bf16, "use_cpu": args.use_cpu, "gradient_checkpointing": args.gradient_checkpointing,
                       "packing": args.packing, "batch_size": args.per_device_train_batch_size,
                       "max_length": args.max_length}}


def side_tunelab(n: int, epochs: float, out: str, extra: list[str] = ()) -> dict:
    """tunelab's SFT path: its data pipeline and trainer, from the quickstart recipe."""
    from tunelab.data.pipeline import build_datasets
    from tunelab.methods.sft import build_trainer
    from tunelab.models.builtin import builtin_model, builtin_tokenizer
    from tunelab.recipe.load import load_recipe

    data = Path(out) / "rows.jsonl"  # the same examples as the TRL side: the first n rows
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(n)))
    loaded = load_recipe("recipes/quickstart/sft.yaml", [
        f"train.output_dir={out}", f"train.epochs={epochs}", "train.report_to=[none]", "train.save_steps=1000000",
        "data.eval=[]", "data.max_length=1024", f"data.train.0.source={data}", *extra])
    recipe = loaded.recipe
    tok = builtin_tokenizer()
    train_ds, _, _ = build_datasets(recipe, tok)
    model = builtin_model("tiny-llama")
    trainer = build_trainer(recipe, model, tok, train_ds, None, [])
    trainer.args.disable_tqdm = True
    tokens = sum(len(x) for x in train_ds["input_ids"]) * epochs
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "steps": trainer.state.global_step, "train_loss": train_loss(trainer),
            "config": {"packing": recipe.data.packing, "max_length": recipe.data.max_length,
                       "batch_size": recipe.train.batch_size, "precision": recipe.train.precision}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--side", choices=["trl", "tunelab"], help=argparse.SUPPRESS)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra recipe override for the tunelab side (dotted.key=value)")
    a = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.side:
        with tempfile.TemporaryDirectory() as out:
            if a.side == "trl":
                result = side_trl(a.rows, a.epochs, out)
            else:
                result = side_tunelab(a.rows, a.epochs, out, a.overrides)
        result["peak_mb"] = peak_memory_mb()
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for side in ("trl", "tunelab"):
        cmd = [sys.executable, __file__, "--side", side, "--rows", str(a.rows), "--epochs", str(a.epochs)]
        cmd += [x for o in a.overrides for x in ("--set", o)] if side == "tunelab" else []
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"{side} side failed:\n{proc.stderr[-4000:]}")
        results[side] = json.loads(line[-1][len("RESULT ") :])
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; rows: {a.rows}; epochs: {a.epochs}")
    for side, r in results.items():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        print(f"{side:8s} {r['tokens_per_s']:10.1f} real tokens/s  ({r['tokens']:.0f} tokens, {r['steps']} steps, "
              f"{r['seconds']:.1f} s, train loss {r['train_loss']:.3f})  peak memory {r['peak_mb']:.0f} MB  {r['config']}")
    ratio = results["tunelab"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
    print(f"ratio tunelab/trl: {ratio:.2f}x")


if __name__ == "__main__":
    main()
