"""The run directory: lock file, metrics.jsonl, data report, plots, checkpoints, final/.

    output_dir/
      recipe.lock.yaml   metrics.jsonl   data_report.json   summary.json
      checkpoint-N/      (written under .staging/, then renamed: never half-written; its
                          tunelab_manifest.json, written last, lists every file's size and sha256)
      final/             (HF format or a PEFT adapter, with the tokenizer)
      tensorboard/       plots/loss.png
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "tunelab_manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(checkpoint: Path) -> Path:
    """``tunelab_manifest.json``: every file of a checkpoint with its size and sha256, written last (via a rename)."""
    files = {str(p.relative_to(checkpoint)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != MANIFEST}
    tmp = checkpoint / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, checkpoint / MANIFEST)
    return checkpoint / MANIFEST


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a file missing, truncated or changed), or None when it is whole.

    Checked against its manifest; a checkpoint without one (written before manifests existed) needs a readable
    trainer_state.json.
    """
    manifest = checkpoint / MANIFEST
    if not manifest.is_file():
        state = checkpoint / "trainer_state.json"
        try:
            json.loads(state.read_text())
        except (OSError, ValueError) as exc:
            return f"no {MANIFEST}, and trainer_state.json is unreadable ({type(exc).__name__})"
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, want in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, the manifest says {want['bytes']} (truncated or overwritten)"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupt)"
    return None


@dataclass
class RunDir:
    """Paths of one run's output directory."""

    root: Path

    @property
    def lock(self) -> Path:
        return self.root / "recipe.lock.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def data_report(self) -> Path:
        return self.root / "data_report.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (incomplete ones live in .staging/ and are ignored)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    @property
    def staging(self) -> Path:
        """Where a checkpoint is written before it is published (``publish_checkpoint``)."""
        return self.root / ".staging"

    def publish_checkpoint(self, staged: Path, keep: int | None) -> Path:
        """Move a fully written checkpoint from ``staging`` into place, then keep only the newest ``keep``.

        The one way every trainer (transformers' and our PPO trainer) makes a checkpoint appear: a rename
        on one filesystem is atomic, so a run killed mid-save never leaves a half checkpoint for
        ``--resume auto`` to pick up. Call it on one process only.
        """
        import shutil

        write_manifest(staged)
        target = self.root / staged.name
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
        shutil.rmtree(self.staging, ignore_errors=True)
        if keep:
            for old in self.checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return target

    def last_checkpoint(self) -> Path | None:
        cps = self.checkpoints()
        return cps[-1] if cps else None

    def last_complete_checkpoint(self, say: Any = None) -> Path | None:
        """The newest checkpoint whose files match its manifest; a corrupt newer one is moved to ``.corrupt/``
        (kept for a look, out of the way of ``--resume auto`` and of the checkpoint rotation) and said."""
        for cp in reversed(self.checkpoints()):
            problem = checkpoint_problem(cp)
            if problem is None:
                return cp
            aside = self.root / ".corrupt" / cp.name
            aside.parent.mkdir(exist_ok=True)
            if aside.exists():
                import shutil

                shutil.rmtree(aside)
            os.replace(cp, aside)
            (say or print)(f"warning: {cp.name} is not a complete checkpoint ({problem}); moved it to {aside} and "
                           "resuming from the one before")
        return None

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def update_summary(self, key: str, entries: dict[str, Any]) -> dict[str, Any]:
        """Merge ``entries`` into summary.json's ``key`` (an evaluation run after training adds its results
        beside those of earlier ones: a task measured again replaces its old entry); written via a rename."""
        summary: dict[str, Any] = json.loads(self.summary.read_text(encoding="utf-8")) if self.summary.is_file() else {}
        block = summary.get(key)
        summary[key] = {**(block if isinstance(block, dict) else {}), **entries}
        tmp = self.root / f".{self.summary.name}.tmp"
        tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        os.replace(tmp, self.summary)
        return summary

    @staticmethod
    def of_model(path: str | Path) -> "RunDir | None":
        """The run a model path belongs to: a run directory (recipe.lock.yaml and final/) or its final/; else None."""
        p = Path(path)
        root = p.parent if p.name == "final" else p
        if (root / "final").is_dir() and (root / "recipe.lock.yaml").is_file() and (p == root or p == root / "final"):
            return RunDir(root)
        return None


def metrics_callback(run: RunDir) -> Any:
    """A TrainerCallback that appends every log line to metrics.jsonl (main process only).

    On resume, lines past the checkpoint's step are dropped first, so the file describes one
    continuous run, and a line ``{"step": N, "event": "resumed"}`` records where it was picked up (a
    run that silently started over would have no such line).
    """
    from transformers import TrainerCallback

    class MetricsJsonl(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero and run.metrics.is_file():
                kept = [m for m in run.read_metrics() if m.get("step", 0) <= state.global_step]
                if state.global_step > 0:
                    kept.append({"step": state.global_step, "epoch": state.epoch, "event": "resumed"})
                run.metrics.write_text("".join(json.dumps(m) + "\n" for m in kept))

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step, "epoch": state.epoch, **logs}
            with run.metrics.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    return MetricsJsonl()


def loss_summary(metrics: list[dict[str, Any]], key: str = "loss") -> dict[str, float] | None:
    """Mean of a logged training metric (loss, or an RL method's reward) over the first and last 10% of logged steps."""
    values = [m[key] for m in metrics if key in m and "eval_loss" not in m]
    if len(values) < 2:
        return None
    k = max(1, len(values) // 10)
    return {"first": sum(values[:k]) / k, "last": sum(values[-k:]) / k, "logged_steps": len(values)}


def plot_metrics(run: RunDir) -> Path | None:
    """plots/loss.png: training loss (and eval loss) against the step."""
    metrics = run.read_metrics()
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run.plots.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss")
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run.root.name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run.plots / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def model_card(recipe: Any, summary: dict[str, Any], report: dict[str, Any] | None,
               template: dict[str, Any] | None, stops: list[str], lock_text: str | None) -> str:
    """final/README.md: what was trained from what, on which data, with what result, and how to load it.

    Written by tunelab instead of the trainer's generic card (which links a hub page for any
    base name, ``builtin:`` ones included, and leaves every field "More Information Needed").
    """
    base = recipe.model.path
    adapter = recipe.peft is not None
    lines = [f"# {Path(recipe.train.output_dir).name}", "",
             f"Fine-tuned with tunelab: method **{recipe.method.name}**"
             + (f" with a PEFT **{recipe.peft.method}** adapter" if adapter else " (all weights)")
             + f", from `{base}`.", ""]
    facts = [("base model", f"`{base}`"
              + (" (a GGUF file, dequantized to float for training; this directory holds ordinary safetensors)"
                 if base.lower().endswith(".gguf") or base == "builtin:smollm2-135m-instruct" else "")),
             ("method", recipe.method.name), ("training steps", str(summary.get("global_step", "?")))]
    if adapter:
        facts.append(("adapter", ", ".join(f"{k} {v}" for k, v in recipe.peft.model_dump().items()
                                           if k in ("method", "r", "alpha", "target_modules") and v is not None)))
    if template:
        facts.append(("chat template", f"{template.get('name')} (sha256 {template.get('sha256')}), loss on assistant "
                      f"turns through {template.get('end_of_turn')}"))
    if stops:
        facts.append(("stops at", ", ".join(f"`{s}`" for s in stops) + " (generation_config.json eos_token_id)"))
    lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in facts], ""]
    if report:
        lines += ["## Data", "", "| split | source | rows | used | truncated | dropped (too long) | skipped (bad) |",
                  "|---|---|---|---|---|---|---|"]
        for split in ("train", "eval"):
            for r in report.get(split, []):
                lines.append(f"| {split} | {r['source']} | {r['rows']} | {r['used']} | {r['truncated']} | "
                             f"{r['dropped_overflow']} | {r['skipped_bad']} |")
        lines += ["", f"max_length {report.get('max_length')}, on_overflow {report.get('on_overflow')}.", ""]
    results = []
    for key in ("train_loss", "train_reward"):
        if key in summary:
            results.append(f"- {key.replace('_', ' ')}: {summary[key]['first']:.4f} (first 10% of logged steps) -> "
                           f"{summary[key]['last']:.4f} (last 10%)")
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    for k, v in after.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            was = before.get(k)
            results.append(f"- eval {k}: " + (f"{was:.4f} -> " if isinstance(was, (int, float)) else "") + f"{v:.4f}")
    if results:
        lines += ["## Results", "", *results, ""]
    run_dir = recipe.train.output_dir
    lines += ["## Use it", "", "```bash", f"tunelab generate {run_dir} \"Hello!\"",
              f"tunelab eval {run_dir} --data <file or builtin:NAME>"]
    if adapter:
        lines += [f"tunelab merge {run_dir} -o {run_dir}-merged   # a standalone model any transformers loads"]
    lines += ["```", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if adapter and getattr(recipe.peft, "method", "") in ("lora", "dora", "qlora"):
        lines += [f"model = AutoModelForCausalLM.from_pretrained(\"{run_dir}-merged\")   # after `tunelab merge`",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{run_dir}-merged\")"]
    elif adapter:
        lines += ["from peft import AutoPeftModelForCausalLM", "",
                  f"model = AutoPeftModelForCausalLM.from_pretrained(\"{run_dir}/final\")",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{run_dir}/final\")"]
    else:
        lines += [f"model = AutoModelForCausalLM.from_pretrained(\"{run_dir}/final\")",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{run_dir}/final\")"]
    lines += ["```", ""]
    if lock_text:
        lines += ["## Recipe (recipe.lock.yaml)", "", "```yaml", lock_text.rstrip(), "```", ""]
    return "\n".join(lines)
