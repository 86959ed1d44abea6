"""``tunelab train``: validate -> data -> lock -> model -> patches -> PEFT -> trainer -> final/.

Every recipe and data error surfaces before a weight is loaded. The run directory layout is
described in ``tunelab.runs``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.data.pipeline import build_datasets
from tunelab.data.templates import choice_of
from tunelab.distributed.config import zero_stage
from tunelab.distributed.faults import (
    PREEMPTED_FILE,
    DivergenceGuard,
    Guards,
    NonFiniteGuard,
    PreemptionGuard,
    start_watchdog,
    write_preempted,
)
from tunelab.distributed.process_group import close_process_group, connectivity_check, deepspeed_process_group
from tunelab.distributed.zero_checkpoint import load_universal, make_universal, resume_plan
from tunelab.errors import Degraded, Preempted, Problem, TrainingStopped, UserError
from tunelab.eval.commands import lm_eval_scores
from tunelab.log import say
from tunelab.models.builtin import builtin_model
from tunelab.models.load import load_model, load_tokenizer, set_stop_tokens
from tunelab.models.peft import apply_peft, quantization_of, uses_virtual_tokens
from tunelab.patches import apply_patches
from tunelab.recipe.load import load_recipe
from tunelab.recipe.lock import read_lock_provenance, write_lock
from tunelab.recipe.schema import Recipe
from tunelab.methods.base import RunHooks
from tunelab.recipe.validate import ResolvedRecipe, validate
from tunelab.report import write_report
from tunelab.runs import RunDir, checkpoint_problem, loss_summary, metrics_callback, model_card, plot_metrics

if TYPE_CHECKING:
    from tunelab.specs import QuantizationSpec



def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_resume(run: RunDir, resume: str | None) -> Path | None:
    """The checkpoint to resume from: ``auto`` = the last complete one (or none), or a path."""
    if resume is None:
        if run.final.exists() or run.checkpoints():
            raise UserError(Problem("train.output_dir", f"{run.root} already holds a run",
                                    "pass --resume auto to continue it, or --set train.output_dir=runs/NEW"))
        return None
    if resume == "auto":
        return run.last_complete_checkpoint(say)
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise UserError(Problem("--resume", f"{resume} is not a complete checkpoint (no trainer_state.json)"))
    if problem := checkpoint_problem(path):
        raise UserError(Problem("--resume", f"{resume} is not a complete checkpoint: {problem}",
                                "resume from an earlier checkpoint, or use --resume auto (the newest complete one)"))
    return path


def check_lock_data(recipe_path: Path, fingerprints: list[dict[str, Any]],
                    chat_template: dict[str, Any] | None = None) -> None:
    """When re-running a lock file, say if the data or the chat template changed since it was written."""
    prov = read_lock_provenance(recipe_path)
    if not prov:
        return
    before_t = prov.get("chat_template") or {}
    if chat_template and before_t.get("sha256") and before_t.get("sha256") != chat_template.get("sha256"):
        say(f"warning: the chat template differs from the lock file's ({before_t.get('name')} sha256 "
             f"{before_t.get('sha256')} then, {chat_template.get('name')} sha256 {chat_template.get('sha256')} now): "
             "the same data renders to other tokens")
    old = {(d.get("split"), d.get("source")): d.get("sha256") for d in prov.get("data", [])}
    for d in fingerprints:
        before = old.get((d.get("split"), d.get("source")))
        if before and d.get("sha256") and before != d["sha256"]:
            say(f"warning: {d['source']} changed since the lock file was written (sha256 differs)")


def one_process_group() -> None:
    """The environment of a 1-process launch, so that DeepSpeed runs under plain `tunelab train`.

    (DeepSpeed always forms a process group; without a launcher's variables it looks for MPI.)
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def fsdp2_problem() -> Problem | None:
    """FSDP2 needs GPUs: accelerate 1.x makes a run FSDP only on an accelerator, never on CPU processes (gloo).

    Without CUDA its state is MULTI_CPU (or no group at all), and transformers then stops with
    "Using fsdp only works in distributed training" after the weights are loaded; said here first.
    """
    if _cuda():
        return None
    return Problem("distributed.strategy", "fsdp2 runs only on GPUs (accelerate shards with FSDP on accelerators, "
                   "not on CPU processes)", "on a CPU use zero3 (or zero2), which DeepSpeed runs over gloo")


def gathered(model: Any) -> Any:
    """A context in which a ZeRO-3 model's parameters are whole on every rank (a no-op otherwise)."""
    import contextlib

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def prepare_processes(recipe: Recipe) -> None:
    """The environment the recipe's strategy needs before anything forms a process group."""
    strategy = recipe.distributed.strategy
    if strategy.startswith("zero") and "WORLD_SIZE" not in os.environ:
        one_process_group()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _cuda() and strategy in ("none", "ddp") and \
            os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        # launched with several processes on a machine without CUDA: accelerate only forms a
        # (gloo) process group on CPU when told to, otherwise every rank trains alone. (Under
        # DeepSpeed the CPU flag would turn DeepSpeed off; PPO asks for gloo itself.)
        os.environ["ACCELERATE_USE_CPU"] = "true"


def prepare_data(resolved: ResolvedRecipe, run: RunDir, tokenizer: Any) -> tuple[Any, Any, Any, dict[str, Any] | None]:
    """(train, eval, data report, chat template record): the data tokenized, the report and the lock file written."""
    recipe = resolved.recipe
    template = choice_of(tokenizer)  # said by validate()
    train_ds, eval_ds, report = build_datasets(recipe, tokenizer, resolved.row_checks)
    for line in report.lines():
        say(line)
    run.data_report.write_text(json.dumps(report.to_dict(), indent=2))
    fingerprints = resolved.fingerprints()  # taken when validate read the files
    template_record = template.lock_record() if template.text else None
    check_lock_data(resolved.loaded.path, fingerprints, template_record)
    write_lock(run.lock, resolved.loaded, fingerprints, template_record)
    return train_ds, eval_ds, report, template_record


def prepare_model(resolved: ResolvedRecipe, run: RunDir, tokenizer: Any) -> Any:
    """The model to train: loaded, patched, with PEFT adapters (a built-in base is saved beside the run for them)."""
    recipe, head = resolved.recipe, resolved.method.model_head
    quantization = quantization_of(recipe)
    model = load_model(recipe.model, quantization, full_finetune=recipe.peft is None, head=head, source=resolved.model)
    if head == "score":  # the reward head reads the last non-pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    builtin = resolved.model.kind == "builtin"
    if builtin:
        model.config.name_or_path = recipe.model.path
    for record in apply_patches(model, recipe, tokenizer):
        say("patch " + ", ".join(f"{k} {v}" for k, v in record.items()))
    if recipe.peft is None:
        return model
    if builtin:
        # plain peft must find the base weights: keep the (seeded, random) base beside the run, patched as the
        # trained model is, in full precision (so that `tunelab merge` folds the adapter into fp32 weights)
        base_dir = (run.root / "base").resolve()
        if not base_dir.exists():
            save_builtin_base(model, quantization, resolved, tokenizer, base_dir)
        model.config.name_or_path = str(base_dir)
        model.name_or_path = str(base_dir)
    model = apply_peft(model, recipe.peft, tokenizer, recipe.model.gradient_checkpointing, head=head)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"peft {recipe.peft.method}: {trainable:,} trainable of {total:,} parameters")
    if uses_virtual_tokens(recipe.peft) and recipe.data.packing:
        say("packing is off: prefix/prompt tuning prepend virtual tokens to every row")
        recipe.data.packing = False
    return model


def save_builtin_base(model: Any, quantization: "QuantizationSpec | None", resolved: ResolvedRecipe, tokenizer: Any, base_dir: Path) -> None:
    """Save the base an adapter on a built-in model records: the loaded model itself when it is full-precision and
    unquantized (its patches are then applied once), else a fresh copy patched the same way."""
    import torch

    recipe = resolved.recipe
    base = model
    if quantization is not None or next(model.parameters()).dtype != torch.float32:
        base = builtin_model(resolved.model.name, head=resolved.method.model_head)
        apply_patches(base, recipe, tokenizer)  # the adapter's base must rotate (and attend) as the trained model
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)


def run_training(recipe_path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                 resume: str | None = None) -> dict[str, Any]:
    """Train a recipe end to end; returns the run summary (also saved as summary.json).

    The phases: the processes' environment, validate (everything but weights, reading each file once),
    the resume plan, the data (tokenized; report and lock file), the model (loaded, patched, PEFT), held-out
    evaluation of the start, training, saving final/, the report.
    """
    loaded = load_recipe(recipe_path, overrides)
    prepare_processes(loaded.recipe)
    resolved = validate(recipe_path, overrides, loaded=loaded)
    for note in resolved.notes:
        say(note)
    recipe, method = resolved.recipe, resolved.method
    if recipe.distributed.strategy == "fsdp2" and (problem := fsdp2_problem()):
        raise UserError(problem)
    if resolved.missing:
        raise UserError(resolved.missing)
    run = RunDir(Path(recipe.train.output_dir))
    resume_from = resolve_resume(run, resume)
    universal, resume_notes = None, list[str]()
    if resume_from is not None and not method.owns_checkpointing:  # a trainer of our own checks its checkpoints
        universal, resume_notes = resume_plan(resume_from, zero_stage(recipe), int(os.environ.get("WORLD_SIZE", "1")))

    from transformers import set_seed

    set_seed(recipe.train.seed)
    run.root.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(recipe.model, resolved.model)
    train_ds, eval_ds, report, template_record = prepare_data(resolved, run, tokenizer)
    model = prepare_model(resolved, run, tokenizer)

    summary: dict[str, Any] = {"output_dir": str(run.root)}
    before = None
    want_before = recipe.train.eval_before_train or method.eval_before
    if eval_ds is not None and want_before and resume_from is None:
        before = method.evaluate(model, eval_ds, recipe, tokenizer)
        summary["eval_before"] = before
        if "perplexity" in before:
            say(f"eval perplexity before training: {before['perplexity']:.3f} ({before['tokens']} tokens)")
        run.summary.write_text(json.dumps(summary, indent=2))
    elif resume_from is not None and run.summary.is_file():
        summary.update({k: v for k, v in json.loads(run.summary.read_text()).items() if k == "eval_before"})
        before = summary.get("eval_before")

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.root / "tensorboard")  # read by transformers' callback
    if recipe.distributed.strategy.startswith("zero") and not method.owns_checkpointing:  # HF's Trainer
        deepspeed_process_group()
    t = recipe.train
    guards = Guards(PreemptionGuard().install(), NonFiniteGuard(t.on_nonfinite),
                    DivergenceGuard(t.on_divergence, t.divergence.factor, t.divergence.patience, method.divergence_metric,
                                    method.divergence_floor))
    preemption = guards.preemption
    if t.on_divergence != "off" and method.divergence_metric is None:
        say(f"train.on_divergence: method {method.name} logs no loss that shows a divergence (see its docs); the "
            "non-finite guard and the held-out comparison still run")
    (run.root / PREEMPTED_FILE).unlink(missing_ok=True)
    trainer = method.build_trainer(recipe, model, tokenizer, train_ds, eval_ds, RunHooks([metrics_callback(run)], guards))
    accelerator = trainer.accelerator
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(f"launched as {launched} processes, but the trainer sees {accelerator.num_processes} "
                           f"({accelerator.distributed_type.value}): each would train alone. Launch with `accelerate "
                           "launch --multi_gpu` (DDP; gloo without CUDA) or --use_deepspeed, not --cpu; or torchrun with "
                           "distributed.strategy set in the recipe")

    connectivity_check()  # every rank is in the group (a missing one is named) before any step runs
    watchdog = start_watchdog(run.root)  # a rank that hangs mid-run: every rank's stack, the laggard named
    # said out loud: a launch that meant N processes but formed none trains N separate copies
    summary["processes"] = accelerator.num_processes
    summary["distributed"] = accelerator.distributed_type.value
    say(f"{accelerator.num_processes} process(es), distributed: {accelerator.distributed_type.value}"
         + (f" ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}" if summary["distributed"] == "DEEPSPEED" else ""))
    if universal is not None:
        for note in resume_notes:
            say(note)
        if accelerator.is_main_process:
            make_universal(universal)
        accelerator.wait_for_everyone()
        load_universal(trainer)
    if resume_from is not None:
        say(f"resuming from {resume_from}")
    elif resume == "auto":
        say("no complete checkpoint to resume from: starting fresh")
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except TrainingStopped as exc:  # diverged or non-finite: the last complete checkpoint stays, no final/
        if trainer.is_world_process_zero():
            summary.update(status=exc.status, stopped=str(exc), global_step=trainer.state.global_step)
            run.summary.write_text(json.dumps(summary, indent=2))
            plot_metrics(run)
            try:
                write_report(run.root)
            except Exception:  # noqa: BLE001 -- the report never hides why the run stopped
                pass
        close_process_group()
        raise
    finally:
        preemption.uninstall()
        if watchdog is not None:
            watchdog.stop()
    if preemption.stopped_at is not None:
        step, last = preemption.stopped_at, run.last_checkpoint()
        if trainer.is_world_process_zero():
            write_preempted(run.root, step, last, preemption.signal)
        close_process_group()
        raise Preempted(f"preempted: stopped at step {step} with a complete checkpoint ({last}); "
                        f"continue with: tunelab train {recipe_path} --resume auto")
    skipped = guards.nonfinite.skipped
    if skipped:
        summary["nonfinite_skipped_steps"] = skipped
        say(f"skipped {len(skipped)} update(s) with a non-finite gradient: step(s) "
            f"{', '.join(map(str, skipped[:20]))}{' ...' if len(skipped) > 20 else ''}")
    warnings: list[str] = []
    degraded = False  # held-out evaluation far worse after training than before, under on_divergence: stop
    if guards.divergence.events:  # on_divergence: warn
        summary["divergence"] = guards.divergence.events
        warnings.append(f"the training loss left its band {len(guards.divergence.events)} time(s) (first at step "
                        f"{guards.divergence.events[0]['step']}; train.on_divergence: warn)")

    saved = method.trained_model(trainer)
    stops = set_stop_tokens(saved, tokenizer)  # a PeftModel passes generation_config through to its base
    trainer.save_model(str(run.final))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(run.final))
        gen = getattr(saved, "generation_config", None)
        if gen is not None and not (run.final / "generation_config.json").is_file():
            gen.save_pretrained(str(run.final))  # an adapter dir too: the stop tokens travel with the result
        if stops:
            say(f"final/ stops generating at token ids {stops} ({', '.join(tokenizer.convert_ids_to_tokens(stops))})")
    summary["global_step"] = trainer.state.global_step
    metrics = run.read_metrics()
    for key, name in (("loss", "train_loss"), ("reward", "train_reward")):
        got = loss_summary(metrics, key)
        if got:
            summary[name] = got
            say(f"train {key}: first 10% of logged steps {got['first']:.4f} -> last 10% {got['last']:.4f} "
                 f"({got['logged_steps']} logged steps)")
    if eval_ds is not None:
        with gathered(model):  # ZeRO-3 leaves every rank a shard; evaluation runs the whole model
            after = method.evaluate(model, eval_ds, recipe, tokenizer)
        summary["eval_after"] = after
        lines, extra = method.report(before, after, recipe)
        summary.update(extra)
        for line in lines:
            say(line)
        if t.on_divergence != "off" and (worse := method.degradation(before, after, t.divergence.eval_factor)):
            warnings.append(worse)
            degraded = t.on_divergence == "stop"
    summary["status"] = Degraded.status if degraded else "done"
    if warnings:
        summary["warnings"] = warnings
        for w in warnings:
            say(f"warning: {w}")
    main = trainer.is_world_process_zero()
    if main:
        plot_metrics(run)
        run.summary.write_text(json.dumps(summary, indent=2))
        if run.final.is_dir():
            stop_names = tokenizer.convert_ids_to_tokens(stops) if stops else []
            (run.final / "README.md").write_text(model_card(recipe, summary, report.to_dict(), template_record,
                                                            stop_names, run.lock.read_text(encoding="utf-8")),
                                                 encoding="utf-8")

    close_process_group()
    if recipe.eval.lm_eval is not None and main:
        # Last, once the run is saved: a task whose data cannot be read then fails nothing but itself. It
        # measures final/ as a user loads it (an adapter merged), after the training copy is freed.
        accelerator.free_memory()  # accelerate's keeps references to the prepared model
        del trainer, model, saved, accelerator
        free_memory()
        summary["lm_eval"] = lm_eval_scores(str(run.final), recipe.eval.lm_eval, output=run.root)
        run.update_summary("lm_eval", summary["lm_eval"])
    if main:
        try:  # a report that cannot be written never fails a finished run
            say(f"report: {write_report(run.root)}")
        except Exception as exc:  # noqa: BLE001
            say(f"warning: report.html not written: {exc}")
    if degraded:
        raise Degraded(f"finished, but {warnings[-1]}: final/ is written ({run.final}) and the run is marked "
                       "degraded (status in summary.json); lower train.learning_rate or check the data, or set "
                       "train.on_divergence: warn to accept such a run")
    say(f"done{' with warnings' if warnings else ''}: {run.final}")
    return summary


def free_memory() -> None:
    """Give back what the objects just deleted held (their CUDA memory too), before another model loads."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
