"""extends, --set typing, ${env:...} and relative data paths."""

import pytest

from tunelab.errors import RecipeError
from tunelab.recipe.load import apply_overrides, load_recipe

BASE = """\
model: {path: "builtin:tiny-llama", dtype: float32}
data:
  train: [{source: "builtin:quickstart/sft"}, {source: "builtin:quickstart/alpaca", format: alpaca}]
  max_length: 256
method: {name: sft}
train: {output_dir: runs/base, learning_rate: 1.0e-3, batch_size: 2}
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_merges_mappings_and_replaces_lists(tmp_path):
    write(tmp_path, "base/_base.yaml", BASE)
    child = write(tmp_path, "child.yaml", 'extends: base/_base.yaml\ntrain: {batch_size: 8}\n'
                  'data: {train: [{source: "builtin:quickstart/text", format: text}]}\n')
    r = load_recipe(child).recipe
    assert r.train.batch_size == 8 and r.train.learning_rate == 1.0e-3 and r.train.output_dir == "runs/base"
    assert [s.source for s in r.data.train] == ["builtin:quickstart/text"]  # the list is replaced
    assert r.data.max_length == 256 and r.model.dtype == "float32"


def test_extends_builtin_and_chain(tmp_path):
    child = write(tmp_path, "c.yaml", "extends: builtin:quickstart/sft\ntrain: {epochs: 2}\n")
    loaded = load_recipe(child)
    assert loaded.recipe.train.epochs == 2 and loaded.recipe.train.output_dir == "runs/quickstart-sft"
    assert [p.name for p in loaded.chain] == ["_base.yaml", "sft.yaml", "c.yaml"]


def test_set_is_typed_by_the_schema(tmp_path):
    path = write(tmp_path, "r.yaml", BASE + "peft: {method: lora}\n")
    r = load_recipe(path, ["train.epochs=3", "model.path=builtin:tiny-qwen2", "data.packing=false",
                           "data.train.1.source=builtin:quickstart/prompt_completion",
                           "data.train.1.format=prompt_completion", "train.report_to=[none]"]).recipe
    assert r.train.epochs == 3.0 and isinstance(r.train.epochs, float)
    assert r.model.path == "builtin:tiny-qwen2" and r.data.packing is False
    assert r.data.train[1].source == "builtin:quickstart/prompt_completion"
    assert r.train.report_to == ["none"]
    assert load_recipe(path, ["peft=null"]).recipe.peft is None
    # a string field keeps the raw text even when it looks like a number or a bool
    data, problems = apply_overrides({"model": {"path": "x"}}, ["model.path=123", "model.revision=true"])
    assert data["model"] == {"path": "123", "revision": "true"} and not problems
    data, _ = apply_overrides({"train": {}}, ["train.seed=7"])
    assert data["train"]["seed"] == 7


def test_set_list_index_out_of_range(tmp_path):
    path = write(tmp_path, "r.yaml", BASE)
    with pytest.raises(RecipeError, match="index 5 out of range"):
        load_recipe(path, ["data.train.5.source=x"])


def test_env_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_RUNS", "/scratch/runs")
    path = write(tmp_path, "r.yaml", BASE.replace("runs/base", '"${env:TUNELAB_RUNS}/exp1"')
                 .replace('dtype: float32', 'dtype: float32, revision: "${env:TUNELAB_NOPE:-main}"'))
    r = load_recipe(path).recipe
    assert r.train.output_dir == "/scratch/runs/exp1" and r.model.revision == "main"


def test_relative_data_paths_follow_the_recipe(tmp_path, monkeypatch):
    write(tmp_path, "proj/data/d.jsonl", '{"text": "hello"}\n')
    path = write(tmp_path, "proj/recipes/r.yaml", BASE.replace(
        '[{source: "builtin:quickstart/sft"}, {source: "builtin:quickstart/alpaca", format: alpaca}]',
        "[{source: ../data/d.jsonl, format: text}]"))
    monkeypatch.chdir(tmp_path)  # somewhere else entirely
    r = load_recipe(path).recipe
    assert r.data.train[0].source == str((tmp_path / "proj/data/d.jsonl").resolve())
