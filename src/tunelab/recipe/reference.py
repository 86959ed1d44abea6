"""The recipe's own documentation, generated from the schema: ``tunelab recipes schema`` and docs/recipe-reference.md.

``json_schema`` is the JSON Schema of a recipe file (what yaml-language-server and other editors
validate and complete against); ``markdown`` is the reference page, one table per block. Both
come from the pydantic models, so a field cannot be added without appearing in them, and the
test suite fails when a field has no description or the page in docs/ is stale.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tunelab.recipe.schema import Recipe

EXTENDS = {"type": "string", "description": "a recipe this one builds on: a path relative to this file, or "
           "builtin:NAME (a shipped recipe); its keys are merged under this file's"}


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a recipe file, ``extends`` included."""
    schema = Recipe.model_json_schema()
    schema["properties"] = {"extends": EXTENDS, **schema["properties"]}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "tunelab recipe"}


def _blocks(model: type[BaseModel], key: str, out: dict[type[BaseModel], list[str]]) -> None:
    """Every block reachable from ``model`` in reading order, each with the dotted keys it sits under."""
    out.setdefault(model, []).append(key)
    for name, field in model.model_fields.items():
        for sub, suffix in _models_in(field.annotation):
            child = f"{key}.{name}{suffix}" if key else f"{name}{suffix}"
            if sub in out:
                if child not in out[sub]:
                    out[sub].append(child)
            else:
                _blocks(sub, child, out)


def _models_in(annotation: Any) -> list[tuple[type[BaseModel], str]]:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    if origin in (list, tuple):
        return [(m, "[]") for arg in typing.get_args(annotation) for m, _ in _models_in(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, "")]
    return []


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        named = list(dict.fromkeys("null" if a is type(None) else _type(a) for a in args))
        return " \\| ".join(named)
    if origin in (list, tuple):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "block (below)"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "" if isinstance(value, BaseModel) else f"`{value}`"
    if field.default is PydanticUndefined:
        return "required"
    value = field.default
    return f"`{'null' if value is None else str(value).lower() if isinstance(value, bool) else value}`"


def markdown() -> str:
    """docs/recipe-reference.md: every block of a recipe, every field with its type, default and description."""
    blocks: dict[type[BaseModel], list[str]] = {}
    _blocks(Recipe, "", blocks)
    lines = ["# Recipe reference", "",
             "Generated from the schema by `python -m tunelab.recipe.reference > docs/recipe-reference.md`; the test "
             "suite fails when this page is stale. `tunelab recipes schema` prints the same schema as JSON Schema "
             "(for editors: see the README)."]
    for model, keys in blocks.items():
        key = keys[0]
        title = ", ".join(f"`{k}`" for k in keys) if key else "the recipe"
        doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        name = model.model_fields.get("name") or model.model_fields.get("method")
        variant = ""
        if name is not None and typing.get_origin(name.annotation) is Literal and key:
            variant = f" ({'name' if 'name' in model.model_fields else 'method'}: " \
                      f"{typing.get_args(name.annotation)[0]})"
        lines += ["", f"## {title}{variant}", "", doc, "", "| key | type | default | description |",
                  "| --- | --- | --- | --- |"]
        if not key:
            lines.append(f"| `extends` | str | `null` | {EXTENDS['description']} |")
        for fname, field in model.model_fields.items():
            desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{fname}` | {_type(field.annotation)} | {_default(field)} | {desc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
