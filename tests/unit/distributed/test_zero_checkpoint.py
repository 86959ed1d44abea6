"""Which checkpoints a run can resume (tunelab.distributed.zero_checkpoint), on hand-made checkpoint folders.

The folders carry only what the check reads: ``latest``, and the engine's model-states file with
its ``ds_config`` and ``dp_world_size`` (as DeepSpeed writes them). The real conversion and loads
run in tests/integration/test_distributed.py.
"""

import json

import pytest
import torch

from tunelab.distributed.zero_checkpoint import make_universal, read_zero_checkpoint, resume_plan
from tunelab.errors import UserError


def _checkpoint(root, stage: int | None, world: int = 2, step: int = 2):
    """checkpoint-STEP as the HF trainer leaves it; with a DeepSpeed part when ``stage`` is given."""
    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if stage is None:
        (ckpt / "optimizer.pt").write_bytes(b"")
        return ckpt
    tag = f"global_step{step}"
    (ckpt / "latest").write_text(tag)
    (ckpt / tag).mkdir()
    name = "mp_rank_00_model_states.pt" if stage < 3 else "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save({"ds_config": {"zero_optimization": {"stage": stage}}, "dp_world_size": world}, ckpt / tag / name)
    return ckpt


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_reads_stage_and_world_size(tmp_path, stage):
    got = read_zero_checkpoint(_checkpoint(tmp_path, stage, world=4))
    assert (got.tag, got.stage, got.world_size) == ("global_step2", stage, 4)
    assert got.universal == tmp_path / "checkpoint-2" / "global_step2_universal"
    assert read_zero_checkpoint(_checkpoint(tmp_path / "plain", None)) is None


def test_same_world_size_loads_as_written(tmp_path):
    assert resume_plan(_checkpoint(tmp_path, 2, world=2), 2, 2) == (None, [])
    assert resume_plan(_checkpoint(tmp_path / "z0", 0, world=2), 0, 1) == (None, [])  # ZeRO-0 shards nothing
    assert resume_plan(_checkpoint(tmp_path / "ddp", None), None, 3) == (None, [])  # one whole optimizer.pt


def test_other_world_size_goes_through_a_universal_checkpoint(tmp_path):
    saved, notes = resume_plan(_checkpoint(tmp_path, 3, world=2), 3, 1)
    assert (saved.stage, saved.world_size) == (3, 2)
    assert "written by 2 process(es), this run has 1" in notes[0] and "global_step2_universal" in notes[0]
    assert "train.grad_accum" in notes[0]  # the global batch changes with the process count


@pytest.mark.parametrize(("saved_stage", "stage", "says"), [
    (2, None, "--set distributed.strategy=zero2"),  # a fresh optimizer under ddp would be silent
    (None, 2, "--set model.path="),
    (2, 3, "--set distributed.strategy=zero2"),
    (3, 1, "--set distributed.strategy=zero3"),
])
def test_what_cannot_be_resumed_is_refused_with_the_fix(tmp_path, saved_stage, stage, says):
    ckpt = _checkpoint(tmp_path, saved_stage)
    with pytest.raises(UserError) as err:
        resume_plan(ckpt, stage, 2)
    text = str(err.value)
    assert "distributed.strategy" in text and str(ckpt) in text and says in text, text


def test_incomplete_deepspeed_part_is_named(tmp_path):
    ckpt = _checkpoint(tmp_path, 2)
    (ckpt / "global_step2" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(UserError, match="no DeepSpeed model-states file"):
        read_zero_checkpoint(ckpt)


def test_failed_conversion_leaves_nothing_behind(tmp_path):
    """A checkpoint DeepSpeed cannot convert (here: no optimizer shards) is an error naming it; no partial folder stays."""
    saved = read_zero_checkpoint(_checkpoint(tmp_path, 2))
    with pytest.raises(UserError) as err:
        make_universal(saved)
    assert "could not convert" in str(err.value) and "resume with 2 process(es)" in str(err.value)
    assert sorted(p.name for p in saved.path.iterdir()) == ["global_step2", "latest", "trainer_state.json"]


@pytest.mark.parametrize(("stage", "like", "want"), [(2, 1, 1), (2, 3, 2), (3, 2, 3)])
def test_unsafe_model_states_are_not_unpickled(tmp_path, stage, like, want):
    """A model-states file holding an object outside torch's safe loader is not run: the shard names answer."""
    import pathlib

    ckpt = _checkpoint(tmp_path, stage, world=3)
    folder = ckpt / "global_step2"
    name = "mp_rank_00_model_states.pt" if stage < 3 else "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save({"ds_config": {"zero_optimization": {"stage": 9}}, "dp_world_size": 9, "odd": pathlib.PurePath("x")},
               folder / name)
    for rank in range(3):
        (folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    got = read_zero_checkpoint(ckpt, like)
    assert (got.stage, got.world_size) == (want, 3)  # not the 9s inside the refused file
