"""The shipped recipe library (recipe/library.py): every YAML under recipes/ (walked recursively) validates, bases
are checked through their children; `tunelab recipes ls|show|cp`."""

from pathlib import Path

import pytest
import yaml

from tunelab.recipe.load import load_recipe
from tunelab.recipe.validate import validate

REPO = Path(__file__).resolve().parents[3]


ALL_YAML = sorted(p for p in (REPO / "recipes").rglob("*") if p.suffix in (".yaml", ".yml"))


RECIPES = [p for p in ALL_YAML if not p.name.startswith("_")]


BASES = [p for p in ALL_YAML if p.name.startswith("_")]


def test_the_walk_finds_the_library():
    names = {str(p.relative_to(REPO)) for p in RECIPES}
    assert "recipes/quickstart/sft.yaml" in names
    assert any(n.startswith("recipes/qwen2.5-0.5b/") for n in names)  # real-model recipes too
    assert len(ALL_YAML) == len(RECIPES) + len(BASES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_recipe_validates(path):
    resolved = validate(path)
    assert resolved.recipe.method.name and resolved.method.name == resolved.recipe.method.name
    assert [c.key for c in resolved.sources] == [f"data.{split}[{i}]" for split in ("train", "eval")
                                                 for i, _ in enumerate(getattr(resolved.recipe.data, split))]
    for note in resolved.notes:  # hub datasets unchecked offline, and a chain's input run not trained yet
        assert ("not checked (offline)" in note or "it is a run's output" in note or note.startswith("chat template ")
                or "both are stop tokens" in note), note


@pytest.mark.parametrize("base", BASES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_base_is_used_by_a_recipe(base):
    users = [p for p in RECIPES if base.resolve() in load_recipe(p).chain]
    assert users, f"{base} is extended by no recipe"


def test_recipes_ls_show_cp(run_cli, tmp_path):
    rc, out, _ = run_cli("recipes", "ls")
    assert rc == 0 and "quickstart/sft " in out and "_base" not in out
    rc, out, _ = run_cli("recipes", "show", "quickstart/sft")
    assert rc == 0 and "extends:" in out
    rc, _, err = run_cli("recipes", "show", "quickstart/sfft")
    assert rc == 2 and "did you mean builtin:quickstart/sft" in err
    rc, out, _ = run_cli("recipes", "cp", "quickstart/sft-lora", tmp_path)
    assert rc == 0
    copied = tmp_path / "sft-lora.yaml"
    assert yaml.safe_load(copied.read_text())["extends"] == "builtin:quickstart/_base"
    rc, out, err = run_cli("validate", copied)  # the copy still resolves its base outside the library
    assert rc == 0, err
    rc, _, err = run_cli("recipes", "cp", "quickstart/sft-lora", tmp_path)
    assert rc == 2 and "already exists" in err
