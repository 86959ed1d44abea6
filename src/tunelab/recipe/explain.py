"""Explain a recipe's schema errors: pydantic's errors -> Problems with dotted keys, the valid keys, did-you-mean.

Also answers "what does the schema expect at this dotted key" (``schema_at``), which ``--set`` uses to
read a value as the type its key takes.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from tunelab.errors import Problem, closest
from tunelab.recipe.schema import Recipe


def _unwrap(ann: Any) -> Any:
    """Strip Annotated and Optional from an annotation."""
    while typing.get_origin(ann) is typing.Annotated:
        ann = typing.get_args(ann)[0]
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return ann


def _union_models(ann: Any) -> list[type[BaseModel]]:
    """The models of a union of models (a discriminated union), else []."""
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        members = [_unwrap(a) for a in typing.get_args(ann)]
        if members and all(isinstance(m, type) and issubclass(m, BaseModel) for m in members):
            return members
    return []


def _tag_of(model: type[BaseModel]) -> tuple[str, str] | None:
    """(discriminator field, tag value) of a registry model, from its Literal field."""
    for key in ("name", "method"):
        f = model.model_fields.get(key)
        if f is not None and typing.get_origin(f.annotation) is typing.Literal:
            return key, typing.get_args(f.annotation)[0]
    return None


def _pick(models: list[type[BaseModel]], tag: Any) -> type[BaseModel] | None:
    for m in models:
        t = _tag_of(m)
        if t is not None and (t[1] == tag or (tag in typing.get_args(m.model_fields[t[0]].annotation))):
            return m
    return None


def schema_at(parts: list[Any], data: Any = None) -> tuple[Any, list[str]]:
    """The annotation at a pydantic error location or a --set path, and that location as names.

    Discriminator tags in pydantic locations (``method.sft.beta``) are folded away, and when
    walking a --set path the union member is chosen from the recipe data (``method.name``).
    """
    ann: Any = Recipe
    names: list[str] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        ann = _unwrap(ann)
        models = _union_models(ann)
        if models:
            chosen = _pick(models, part)
            if chosen is not None and isinstance(part, str) and part not in chosen.model_fields:
                ann = chosen  # a pydantic tag in the location: skip it
                i += 1
                continue
            tag = None
            if isinstance(data, dict):
                t = _tag_of(models[0])
                tag = data.get(t[0]) if t else None
            chosen = _pick(models, tag)
            if chosen is None:
                return None, names + [str(p) for p in parts[i:]]
            ann = chosen
            continue
        origin = typing.get_origin(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            tag = _tag_of(ann)
            if tag is not None and part == tag[1] and part not in ann.model_fields:
                i += 1  # a one-member registry union collapses to its model; pydantic still puts the tag in loc
                continue
            f = ann.model_fields.get(str(part))
            names.append(str(part))
            if f is None:
                return None, names + [str(p) for p in parts[i + 1 :]]
            ann = f.annotation
            data = data.get(part) if isinstance(data, dict) else None
        elif origin is list and isinstance(part, int | str) and str(part).isdigit():
            names[-1] = f"{names[-1]}[{part}]" if names else f"[{part}]"
            ann = typing.get_args(ann)[0]
            data = data[int(part)] if isinstance(data, list) and int(part) < len(data) else None
        elif origin is dict:
            names.append(str(part))
            ann = typing.get_args(ann)[1]
            data = data.get(part) if isinstance(data, dict) else None
        else:
            return ann, names  # inside a plain union: stop at the field
        i += 1
    return ann, names


def _tags_at(loc: list[Any], data: Any) -> str:
    """The registry names a discriminated block at ``loc`` accepts, e.g. 'sft' for method."""
    ann: Any = Recipe
    for part in loc:
        ann = _unwrap(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel) and str(part) in ann.model_fields:
            ann = ann.model_fields[str(part)].annotation
    ann = _unwrap(ann)
    models = _union_models(ann) or ([ann] if isinstance(ann, type) and issubclass(ann, BaseModel) else [])
    tags = [t[1] for m in models if (t := _tag_of(m)) is not None]
    return ", ".join(repr(t) for t in tags)


def _valid_keys(ann: Any) -> list[str]:
    ann = _unwrap(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return list(ann.model_fields)
    return []


def _describe(err: dict[str, Any], data: dict[str, Any]) -> Problem:
    loc = list(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        parent_ann, parent_names = schema_at(loc[:-1], data)
        key = str(loc[-1])
        where = ".".join(parent_names + [key])
        valid = _valid_keys(parent_ann) + (["extends"] if not parent_names else [])
        guess = closest(key, valid)
        hint = f"did you mean '{guess}'?" if guess else ("valid keys: " + ", ".join(valid) if valid else "")
        return Problem(where, "unknown key", hint)
    _, names = schema_at(loc, data)
    where = ".".join(names) or "recipe"
    if kind == "missing":
        return Problem(where, "required key is missing")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        ctx = err.get("ctx", {})
        known = ctx.get("expected_tags", "")
        if kind == "union_tag_not_found":
            field_name = ctx.get("discriminator", "'name'").strip("'")
            return Problem(f"{where}.{field_name}", "required key is missing", f"one of: {_tags_at(loc, data)}")
        tag = str(ctx.get("tag"))
        guess = closest(tag, [t.strip(" '") for t in known.split(",")])
        field_name = ctx.get("discriminator", "'name'").strip("'")
        what = "method" if field_name == "name" and names == ["method"] else field_name
        hint = f"did you mean '{guess}'? " if guess else ""
        return Problem(f"{where}.{field_name}", f"unknown {what} {tag!r}", f"{hint}known: {known}")
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    if kind == "literal_error":
        options = [o.strip(" '") for o in re.split(r",| or ", err.get("ctx", {}).get("expected", ""))]
        guess = closest(str(got), [o for o in options if o])
        return Problem(where, f"{msg}, got {got!r}", f"did you mean '{guess}'?" if guess else "")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind in ("greater_than", "greater_than_equal",
                                                                      "less_than", "less_than_equal", "too_short"):
        return Problem(where, f"{msg}, got {got!r}")
    return Problem(where, msg)


def validation_problems(exc: ValidationError, data: dict[str, Any]) -> list[Problem]:
    """Turn pydantic's errors into Problems with dotted keys and 'did you mean' hints."""
    return [_describe(dict(e), data) for e in exc.errors()]


# --- --set overrides -------------------------------------------------------------------------


def keeps_string(ann: Any) -> bool:
    ann = _unwrap(ann)
    if ann is str:
        return True
    if typing.get_origin(ann) is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(ann))
    return False
