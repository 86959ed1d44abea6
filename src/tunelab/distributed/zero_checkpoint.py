"""Resuming a DeepSpeed ZeRO checkpoint, also with another number of processes.

A ZeRO checkpoint (``checkpoint-N/global_stepN/``) holds one optimizer shard per process, cut for
the world size that wrote it; DeepSpeed refuses to load it at another world size. DeepSpeed's
*universal checkpoint* stores every parameter's fp32 weights and Adam moments whole, so any world
size can cut its own shards from it. When the world size changed, tunelab converts the checkpoint
(``deepspeed.checkpoint.ds_to_universal``, once, beside the original: ``global_stepN_universal/``)
and tells the engine to load it (``checkpoint.load_universal``).

What works, measured on CPU in tests/integration/test_distributed.py: ZeRO-2 and ZeRO-3, SFT and
DPO, 2 processes -> 1. What does not: another ZeRO stage (DeepSpeed's loader asserts), and a
ZeRO checkpoint under ddp/none or the other way round (the optimizer state is stored differently);
both are refused before any weights load, with the way out named.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import Problem, UserError

UNIVERSAL_SUFFIX = "_universal"


@dataclass(frozen=True)
class ZeroCheckpoint:
    """What a HF-trainer checkpoint's DeepSpeed part says about the run that wrote it."""

    path: Path  # checkpoint-N
    tag: str  # global_stepN
    stage: int
    world_size: int

    @property
    def universal(self) -> Path:
        return self.path / f"{self.tag}{UNIVERSAL_SUFFIX}"


def read_zero_checkpoint(checkpoint: Path, like_stage: int | None = None) -> ZeroCheckpoint | None:
    """The ZeRO stage and world size of ``checkpoint`` (None when DeepSpeed did not write it).

    Read from the engine's model-states file (its ``ds_config`` and ``dp_world_size``), memory-mapped:
    the weights it may hold are not read. ``like_stage`` (this run's stage) only settles ZeRO-1 vs
    ZeRO-2 when the file must be read from its shard names instead (see ``_from_file_names``).
    """
    latest = checkpoint / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    folder = checkpoint / tag
    states = sorted(folder.glob("mp_rank_00_model_states.pt")) or sorted(folder.glob("*zero_pp_rank_0_mp_rank_00_model_states.pt"))
    if not states:
        raise UserError(Problem("--resume", f"{folder} has no DeepSpeed model-states file (the checkpoint is incomplete)",
                                "resume from an earlier checkpoint-N"))
    import pickle

    import torch

    try:  # tensors, sizes and plain containers only: nothing in the file runs code
        meta = torch.load(states[0], map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        return _from_file_names(checkpoint, tag, like_stage)
    stage = int(meta["ds_config"].get("zero_optimization", {}).get("stage", 0))
    return ZeroCheckpoint(path=checkpoint, tag=tag, stage=stage, world_size=int(meta["dp_world_size"]))


def _from_file_names(checkpoint: Path, tag: str, like_stage: int | None) -> ZeroCheckpoint:
    """Stage and world size from the shard files, for a model-states file the safe loader refuses.

    One optimizer shard per process (none under ZeRO-0); ZeRO-3 also shards the model states.
    ZeRO-1 and ZeRO-2 write the same files: taken as the stage this run asks for when it is one of them.
    """
    folder = checkpoint / tag
    world = len(list(folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))
    if list(folder.glob("*zero_pp_rank_0_mp_rank_00_model_states.pt")):
        stage = 3
    elif world:
        stage = like_stage if like_stage in (1, 2) else 2
    else:
        stage, world = 0, 1  # ZeRO-0 resumes at any world size
    return ZeroCheckpoint(path=checkpoint, tag=tag, stage=stage, world_size=world)


def resume_plan(checkpoint: Path, stage: int | None, world_size: int) -> tuple[ZeroCheckpoint | None, list[str]]:
    """Check that ``checkpoint`` can be resumed by this run (ZeRO ``stage`` or None, ``world_size`` processes).

    Returns the checkpoint's ZeRO description when it must be loaded through a universal
    checkpoint (the world size changed), else None, and notes to print. Raises UserError for what
    cannot be resumed, before any weights load.
    """
    saved = read_zero_checkpoint(checkpoint, stage)
    if saved is None and stage is None:
        return None, []
    if saved is None:
        raise UserError(Problem("distributed.strategy", f"{checkpoint} was written without DeepSpeed (its optimizer "
                                f"state is one optimizer.pt); this run is zero{stage}",
                                "resume with the strategy that wrote it, or start a new run from its weights: "
                                f"--set model.path={checkpoint}"))
    if stage is None:
        raise UserError(Problem("distributed.strategy", f"{checkpoint} was written by DeepSpeed ZeRO-{saved.stage} "
                                f"({saved.world_size} process(es)); this run is ddp or none, which would "
                                "start with a fresh optimizer", f"resume with --set distributed.strategy=zero{saved.stage} "
                                "(any number of processes)"))
    if saved.stage != stage:
        raise UserError(Problem("distributed.strategy", f"{checkpoint} was written by ZeRO-{saved.stage}; this run is "
                                f"ZeRO-{stage}, and DeepSpeed cannot load one stage's optimizer shards into another",
                                f"resume with --set distributed.strategy=zero{saved.stage}"))
    if saved.world_size == world_size or stage == 0:  # ZeRO-0 keeps the whole optimizer state: nothing to re-cut
        return None, []
    note = (f"{checkpoint} was written by {saved.world_size} process(es), this run has {world_size}: its ZeRO "
            f"optimizer state is re-cut through a universal checkpoint ({saved.universal.name}/). The global batch "
            "is micro batch x grad_accum x processes: set train.batch_size or train.grad_accum to keep it")
    return saved, [note]


def make_universal(saved: ZeroCheckpoint) -> Path:
    """Convert ``saved`` to DeepSpeed's universal format once (beside the original), returning its folder.

    Written under a temporary name and renamed when complete, so a run killed mid-conversion leaves
    nothing that a later resume would mistake for a whole conversion. Call on one process only.
    """
    target = saved.universal
    if not target.is_dir():
        staging = saved.path / f".{target.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               str(saved.path / saved.tag), "--output_folder", str(staging), "--inject_missing_state",
               "--num_extract_workers", "1", "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise UserError(Problem("--resume", f"DeepSpeed could not convert {saved.path / saved.tag} to a universal "
                                    f"checkpoint: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}",
                                    f"resume with {saved.world_size} process(es), as it was written"))
        os.replace(staging, target)
    # written by us rather than by the converter, which would name the temporary folder
    (saved.path / "latest_universal").write_text(target.name)
    return target


def load_universal(trainer: Any) -> None:
    """Make the trainer's DeepSpeed engine load a universal checkpoint when it resumes.

    The engine is built inside ``trainer.train()`` from the plugin's config dict (the same object
    transformers fills from TrainingArguments), so the flag set here reaches it.
    """
    plugin = trainer.accelerator.state.deepspeed_plugin
    for config in {id(c): c for c in (plugin.deepspeed_config, plugin.hf_ds_config.config)}.values():
        config.setdefault("checkpoint", {})["load_universal"] = True
