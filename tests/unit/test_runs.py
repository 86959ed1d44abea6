"""runs.py: a checkpoint's manifest (sizes and sha256, written last) and how --resume auto picks the newest
complete checkpoint, moving a corrupt one aside and saying so."""

import json

import pytest

from tunelab.runs import MANIFEST, RunDir, checkpoint_problem


def _publish(run: RunDir, step: int, keep=None):
    staged = run.staging / f"checkpoint-{step}"
    (staged / "sub").mkdir(parents=True)
    (staged / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (staged / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (staged / "sub" / "optimizer.pt").write_bytes(b"x" * 1000)
    return run.publish_checkpoint(staged, keep)


def test_manifest_lists_every_file_and_a_whole_checkpoint_passes(tmp_path):
    cp = _publish(RunDir(tmp_path), 5)
    files = json.loads((cp / MANIFEST).read_text())["files"]
    assert set(files) == {"trainer_state.json", "model.safetensors", "sub/optimizer.pt"}
    assert files["model.safetensors"]["bytes"] == 10240
    assert checkpoint_problem(cp) is None
    assert not (tmp_path / ".staging").exists()


@pytest.mark.parametrize("damage, says", [
    ("truncate", "model.safetensors has 5000 bytes, the manifest says 10240"),
    ("flip", "model.safetensors does not match its sha256"),
    ("delete", "sub/optimizer.pt is missing"),
    ("manifest", f"{MANIFEST} is unreadable"),
])
def test_damage_is_found(tmp_path, damage, says):
    cp = _publish(RunDir(tmp_path), 5)
    weights = cp / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[777] ^= 1
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        (cp / "sub" / "optimizer.pt").unlink()
    else:
        (cp / MANIFEST).write_text('{"files": ')
    assert says in checkpoint_problem(cp)


def test_checkpoint_without_manifest_needs_a_readable_state(tmp_path):
    cp = tmp_path / "checkpoint-3"
    cp.mkdir()
    (cp / "trainer_state.json").write_text("{}")
    assert checkpoint_problem(cp) is None
    (cp / "trainer_state.json").write_text("{trunc")
    assert "trainer_state.json is unreadable" in checkpoint_problem(cp)


def test_last_complete_checkpoint_moves_corrupt_ones_aside(tmp_path):
    run = RunDir(tmp_path)
    for step in (2, 4, 6):
        _publish(run, step)
    (tmp_path / "checkpoint-6" / "model.safetensors").write_bytes(b"")
    said = []
    assert run.last_complete_checkpoint(said.append) == tmp_path / "checkpoint-4"
    assert (tmp_path / ".corrupt" / "checkpoint-6").is_dir() and not (tmp_path / "checkpoint-6").exists()
    assert len(said) == 1 and "checkpoint-6 is not a complete checkpoint (model.safetensors has 0 bytes" in said[0]
    assert run.last_complete_checkpoint(said.append) == tmp_path / "checkpoint-4" and len(said) == 1
    for cp in run.checkpoints():
        (cp / MANIFEST).unlink()
        (cp / "trainer_state.json").write_text("")
    assert run.last_complete_checkpoint(said.append) is None and len(said) == 3


def test_rotation_keeps_the_newest(tmp_path):
    run = RunDir(tmp_path)
    for step in (1, 2, 3):
        _publish(run, step, keep=2)
    assert [p.name for p in run.checkpoints()] == ["checkpoint-2", "checkpoint-3"]


def test_update_summary_merges_into_one_key_and_keeps_the_rest(tmp_path):
    run = RunDir(tmp_path)
    run.summary.write_text(json.dumps({"global_step": 7, "lm_eval": {"a": {"acc": 0.5}, "b": {"acc": 0.1}}}))
    got = run.update_summary("lm_eval", {"b": {"acc": 0.9}, "c": {"acc": 0.2}})
    assert got == json.loads(run.summary.read_text()) == {
        "global_step": 7, "lm_eval": {"a": {"acc": 0.5}, "b": {"acc": 0.9}, "c": {"acc": 0.2}}}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind
    fresh = RunDir(tmp_path / "new")
    fresh.root.mkdir()
    assert fresh.update_summary("lm_eval", {"a": {}}) == {"lm_eval": {"a": {}}}


def test_of_model_finds_the_run_of_a_run_dir_or_its_final(tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    assert RunDir.of_model(tmp_path / "run") is None  # no lock file: not a tunelab run
    (tmp_path / "run" / "recipe.lock.yaml").write_text("{}")
    assert RunDir.of_model(tmp_path / "run") == RunDir(tmp_path / "run")
    assert RunDir.of_model(str(tmp_path / "run" / "final")) == RunDir(tmp_path / "run")
    assert RunDir.of_model(tmp_path / "elsewhere") is None
    assert RunDir.of_model("builtin:tiny-llama") is None
