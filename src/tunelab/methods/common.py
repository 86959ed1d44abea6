"""What every method's trainer shares: TrainingArguments from the recipe, atomic checkpoints, the fault guards."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.distributed.config import deepspeed_config, fsdp_config, resolve_precision, zero_stage
from tunelab.distributed.faults import Guards
from tunelab.distributed.process_group import cuda_available, deepspeed_needs_gloo
from tunelab.runs import RunDir
from tunelab.specs import RecipeSpec


@dataclass(frozen=True)
class Owned:
    """A TRL config field the recipe decides: its value and the recipe key that decides it.

    ``method.trl`` may not set an owned field (it would silently win over the recipe): validate names ``key``.
    ``key`` is a dotted recipe key, or ``tunelab: WHY`` for a field tunelab fixes for a reason of its own.
    """

    key: str
    value: Any
    follows: tuple[str, ...] = ()  # other recipe keys its value follows (a default taken from another key)


@dataclass(frozen=True)
class Default:
    """A TRL config field tunelab sets to a default of its own, which ``method.trl`` may change."""

    value: Any


Setting = Owned | Default


def training_fields(recipe: "RecipeSpec") -> dict[str, Setting]:
    """Every TrainingArguments field tunelab sets, with the recipe key that decides it (one source of truth).

    What ``method.trl`` may not set is derived from here (``Owned``), together with each method's own
    ``trl_fields``: there is no second, hand-kept list to drift.
    """
    t = recipe.train
    precision = resolve_precision(t.precision)
    has_eval = bool(recipe.data.eval) or recipe.data.eval_split > 0
    report_to = [r for r in t.report_to if r != "none"]
    distributed = distributed_arguments(recipe)
    return dict(
        # generated from the distributed: block (None where the strategy uses none of them)
        deepspeed=Owned("distributed.strategy", distributed.get("deepspeed")),
        accelerator_config=Owned("distributed.strategy", distributed.get("accelerator_config")),
        fsdp=Owned("distributed.strategy", distributed.get("fsdp")),
        fsdp_config=Owned("distributed.fsdp", distributed.get("fsdp_config")),
        # several processes without CUDA: gloo, also under DeepSpeed (accelerate otherwise forms no group there)
        ddp_backend=Owned("distributed.strategy",
                          "gloo" if not cuda_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None),
        output_dir=Owned("train.output_dir", t.output_dir),
        num_train_epochs=Owned("train.epochs", t.epochs),
        max_steps=Owned("train.max_steps", t.max_steps),
        learning_rate=Owned("train.learning_rate", t.learning_rate),
        lr_scheduler_type=Owned("train.lr_scheduler", t.lr_scheduler),
        warmup_steps=Owned("train.warmup_ratio", t.warmup_ratio),  # transformers 5: a float < 1 is a ratio
        weight_decay=Owned("train.weight_decay", t.weight_decay),
        max_grad_norm=Owned("train.max_grad_norm", t.max_grad_norm),
        optim=Owned("train.optim", t.optim),
        per_device_train_batch_size=Owned("train.batch_size", t.batch_size),
        per_device_eval_batch_size=Owned("train.eval_batch_size", t.eval_batch_size or t.batch_size,
                                         follows=("train.batch_size",)),
        gradient_accumulation_steps=Owned("train.grad_accum", t.grad_accum),
        seed=Owned("train.seed", t.seed),
        data_seed=Owned("train.seed", t.seed),
        bf16=Owned("train.precision", precision == "bf16"),
        fp16=Owned("train.precision", precision == "fp16"),
        activation_checkpointing=Owned("model.gradient_checkpointing", recipe.model.gradient_checkpointing),
        # its deprecated alias: transformers ignores it once activation_checkpointing is set (and mirrors that)
        gradient_checkpointing=Owned("model.gradient_checkpointing", None),
        logging_steps=Owned("train.logging_steps", t.logging_steps),
        logging_first_step=Owned("tunelab: the divergence guard's band starts from the first logged loss", True),
        # a NaN/inf loss is logged as it is (train.on_nonfinite acts on it)
        logging_nan_inf_filter=Owned("train.on_nonfinite", False),
        save_strategy=Owned("train.save_steps", "steps"),
        save_steps=Owned("train.save_steps", t.save_steps),
        save_total_limit=Owned("train.save_total_limit", t.save_total_limit),
        save_only_model=Owned("tunelab: --resume needs the optimizer and scheduler states in every checkpoint", False),
        eval_strategy=Owned("train.eval_steps", "steps" if (has_eval and t.eval_steps) else "no",
                            follows=("data.eval", "data.eval_split")),
        eval_steps=Owned("train.eval_steps", t.eval_steps),
        report_to=Owned("train.report_to", report_to or "none"),
        dataloader_num_workers=Owned("train.num_workers", t.num_workers),
        remove_unused_columns=Owned("tunelab: the data pipeline hands over only the columns the trainer reads", True),
        dataloader_pin_memory=Default(cuda_available()),
        disable_tqdm=Default(False),
    )


def training_arguments(recipe: "RecipeSpec") -> dict[str, Any]:
    """TrainingArguments values filled from ``recipe.train``, ``recipe.model`` and ``recipe.distributed``."""
    return {name: f.value for name, f in training_fields(recipe).items()}


def distributed_arguments(recipe: "RecipeSpec") -> dict[str, Any]:
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


def guarded_trainer(trainer_cls: type, guards: Guards) -> type:
    """A subclass of ``trainer_cls`` whose checkpoints appear whole or not at all, and whose steps the non-finite
    guard watches under DeepSpeed too.

    Each checkpoint is written under ``output_dir/.staging/`` and renamed into place when
    complete (a rename is atomic on one filesystem), so a run killed mid-save never leaves a
    half checkpoint that ``--resume auto`` would pick up.

    Under DeepSpeed the engine owns the gradients and steps inside backward, so the guard's
    pre-update gradient check (a transformers callback) sees none: there each step's loss and the
    engine's global gradient norm are checked once the step is done, before anything logs or saves
    it (``train.on_nonfinite: stop``; ``skip`` is refused under ZeRO at validate).
    """

    class GuardedTrainer(trainer_cls):  # type: ignore[misc, valid-type]
        _get_output_dir: Any  # transformers' Trainer: the checkpoint folder of a trial
        is_deepspeed_enabled: bool
        model_wrapped: Any

        def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            loss = super().training_step(model, inputs, *args, **kwargs)
            if self.is_deepspeed_enabled:
                step = self.state.global_step + 1
                guards.nonfinite.check_loss(loss, step)
                if self.accelerator.sync_gradients and hasattr(self.model_wrapped, "get_global_grad_norm"):
                    guards.nonfinite.check_grad_norm(self.model_wrapped.get_global_grad_norm(), step)
            return loss

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

    GuardedTrainer.__name__ = f"Guarded{trainer_cls.__name__}"
    return GuardedTrainer
