"""What every method's trainer shares: TrainingArguments from the recipe, atomic checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.distributed.config import deepspeed_config, fsdp_config, resolve_precision, zero_stage
from tunelab.distributed.process_group import cuda_available, deepspeed_needs_gloo
from tunelab.runs import RunDir

if TYPE_CHECKING:
    from tunelab.recipe.schema import Recipe


def training_arguments(recipe: "Recipe") -> dict[str, Any]:
    """TrainingArguments fields filled from ``recipe.train`` and ``recipe.model`` (one source of truth)."""
    t = recipe.train
    precision = resolve_precision(t.precision)
    has_eval = bool(recipe.data.eval) or recipe.data.eval_split > 0
    report_to = [r for r in t.report_to if r != "none"]
    return dict(**distributed_arguments(recipe),
        output_dir=t.output_dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=recipe.model.gradient_checkpointing,
        dataloader_pin_memory=cuda_available(),
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN/inf loss is logged as it is (train.on_nonfinite acts on it)
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if (has_eval and t.eval_steps) else "no",
        eval_steps=t.eval_steps,
        report_to=report_to or "none",
        dataloader_num_workers=t.num_workers,
        disable_tqdm=False,
        save_only_model=False,
        remove_unused_columns=True,
        # several processes without CUDA: gloo, also under DeepSpeed (accelerate otherwise forms no group there)
        ddp_backend="gloo" if not cuda_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )


def distributed_arguments(recipe: "Recipe") -> dict[str, Any]:
    """TrainingArguments for ``recipe.distributed``: the generated DeepSpeed JSON (zero*) or FSDP2 settings.

    The world size is the launcher's (WORLD_SIZE); DeepSpeed checks train_batch_size against it.
    """
    if zero_stage(recipe) is not None:
        args: dict[str, Any] = {"deepspeed": deepspeed_config(recipe, int(os.environ.get("WORLD_SIZE", "1")))}
        if deepspeed_needs_gloo():
            # transformers forms a DeepSpeed group without a backend, i.e. none on a CPU: use the gloo one
            # that deepspeed_process_group() formed (a no-op on GPUs, where it is NCCL)
            args["accelerator_config"] = {"use_configured_state": True}
        return args
    if recipe.distributed.strategy == "fsdp2":
        return {"fsdp": True, "fsdp_config": fsdp_config(recipe)}
    return {}


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full...); the earlier checkpoints are intact and resumable."""


def checkpoint_write_error(run: RunDir, step: int, exc: OSError) -> CheckpointWriteError:
    """Clean up the half-written checkpoint and say what is left to resume from."""
    import shutil

    shutil.rmtree(run.staging, ignore_errors=True)
    last = run.last_checkpoint()
    left = f"the last complete checkpoint, {last.name}, is intact" if last else "there is no earlier checkpoint"
    return CheckpointWriteError(f"writing checkpoint-{step} failed ({exc.strerror or exc}); nothing of it was "
                                f"published and {left}: free space (or fix {run.root}) and run again with --resume auto")


def atomic_checkpoints(trainer_cls: type) -> type:
    """A subclass of ``trainer_cls`` whose checkpoints appear whole or not at all.

    Each checkpoint is written under ``output_dir/.staging/`` and renamed into place when
    complete (a rename is atomic on one filesystem), so a run killed mid-save never leaves a
    half checkpoint that ``--resume auto`` would pick up.
    """

    class AtomicCheckpointTrainer(trainer_cls):  # type: ignore[misc, valid-type]
        _get_output_dir: Any  # transformers' Trainer: the checkpoint folder of a trial

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            run = RunDir(Path(self._get_output_dir(trial=trial)))
            original: Any = self._get_output_dir
            self._get_output_dir = lambda trial=None: str(run.staging)  # type: ignore[method-assign]
            try:
                super()._save_checkpoint(model, trial)
                self.accelerator.wait_for_everyone()
                if self.args.should_save:
                    run.publish_checkpoint(run.staging / f"checkpoint-{self.state.global_step}",
                                           self.args.save_total_limit)
            except OSError as exc:  # a full disk, a quota, a vanished mount: the published checkpoints are untouched
                raise checkpoint_write_error(run, self.state.global_step, exc) from exc
            finally:
                self._get_output_dir = original  # type: ignore[method-assign]
            self.accelerator.wait_for_everyone()

    AtomicCheckpointTrainer.__name__ = f"Atomic{trainer_cls.__name__}"
    return AtomicCheckpointTrainer
