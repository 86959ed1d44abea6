"""The schema documents itself (recipe/reference.py): every field described, the JSON Schema right for the shipped
recipes, the page fresh."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from tunelab.recipe.load import resolve_extends
from tunelab.recipe.reference import json_schema, markdown

ROOT = Path(__file__).resolve().parents[3]


def _fields(schema: dict) -> list[tuple[str, dict]]:
    """(Block.field, property schema) of every block in the JSON Schema."""
    out = [(f"Recipe.{k}", v) for k, v in schema["properties"].items()]
    for name, block in schema.get("$defs", {}).items():
        out += [(f"{name}.{k}", v) for k, v in block.get("properties", {}).items()]
    return out


def test_every_recipe_field_has_a_description():
    fields = _fields(json_schema())
    assert len(fields) > 150  # every block is in it, methods and patches included
    missing = [name for name, prop in fields if not prop.get("description", "").strip()]
    assert not missing, f"fields without a description (Field(description=...)): {missing}"


def test_recipes_schema_prints_the_json_schema(run_cli):
    code, out, err = run_cli("recipes", "schema")
    assert code == 0, err
    schema = json.loads(out)
    assert schema["$schema"].startswith("https://json-schema.org/") and "extends" in schema["properties"]
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml")
                                        if not p.name.startswith("_")))
def test_every_shipped_recipe_is_valid_against_the_json_schema(path):
    """What an editor checks against is what tunelab accepts: each shipped recipe (extends resolved) passes."""
    data, _ = resolve_extends(ROOT / path)
    jsonschema.validate(data, json_schema())


def test_the_json_schema_rejects_what_the_recipe_loader_rejects():
    data, _ = resolve_extends(ROOT / "recipes/quickstart/sft.yaml")
    for bad in ({**data, "trian": {}}, {**data, "train": {**data.get("train", {}), "learning_rate": "fast"}},
                {**data, "method": {"name": "dpo", "beta": -1}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, json_schema())


def test_the_recipe_reference_page_is_fresh():
    page = ROOT / "docs" / "recipe-reference.md"
    assert page.read_text(encoding="utf-8") == markdown(), (
        "docs/recipe-reference.md is stale: python -m tunelab.recipe.reference > docs/recipe-reference.md")


def test_the_reference_page_lists_every_field():
    page = markdown()
    for name, _ in _fields(json_schema()):
        assert f"| `{name.split('.')[-1]}` |" in page, name
