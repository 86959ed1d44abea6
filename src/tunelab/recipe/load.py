"""Load a recipe: YAML (safe_load) -> ``extends`` -> ``${env:VAR}`` -> ``--set`` overrides -> schema.

Everything here is pure Python and pydantic: a broken recipe is reported before torch,
transformers or TRL is imported. All problems are collected and raised together as one
``RecipeError``, each naming the dotted key, what is wrong and, for a misspelt key, the
closest valid one.
"""

from __future__ import annotations

import copy
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tunelab.errors import Problem, RecipeError, closest
from tunelab.recipe.schema import Recipe

ENV_PATTERN = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class LoadedRecipe:
    """A validated recipe plus where it came from (for the lock file and relative paths)."""

    recipe: Recipe
    path: Path
    data: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    chain: list[Path] = field(default_factory=list)


def library_dir() -> Path:
    """The shipped recipe library: package data when installed, the repo's recipes/ when editable."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_recipes", here.parent.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise RecipeError(Problem("", "the recipe library is missing from this installation", "reinstall tunelab"))


def resolve_builtin_recipe(name: str) -> Path:
    """``builtin:quickstart/sft`` -> the library file quickstart/sft.yaml."""
    lib = library_dir()
    rel = name[len("builtin:") :] if name.startswith("builtin:") else name
    path = lib / (rel if rel.endswith((".yaml", ".yml")) else rel + ".yaml")
    if not path.is_file():
        known = sorted(str(p.relative_to(lib).with_suffix("")) for p in lib.rglob("*.yaml"))
        hint = closest(rel, known)
        raise RecipeError(
            Problem(name, "no such built-in recipe", f"did you mean builtin:{hint}?" if hint else "see `tunelab recipes ls`")
        )
    return path


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse one recipe file; syntax errors name the file, line and column."""
    if not path.is_file():
        raise RecipeError(Problem(str(path), "recipe file not found"))
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(Problem(where, f"YAML syntax error: {problem}", "check indentation and quoting")) from None
    if data is None:
        raise RecipeError(Problem(str(path), "recipe file is empty", "a recipe needs at least model, data and method"))
    if not isinstance(data, dict):
        raise RecipeError(Problem(str(path), f"a recipe must be a mapping of keys, got {type(data).__name__}"))
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else (lists included) is replaced by ``over``."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _anchor_data_paths(data: dict[str, Any], base_dir: Path) -> None:
    """Make relative data file paths relative to the recipe that names them (if the file is there).

    Data sources (``data.train/eval[].source``) and a patch's ``calibration_data``.
    """
    def anchor(entry: Any, key: str) -> None:
        if not isinstance(entry, dict) or not isinstance(entry.get(key), str):
            return
        s = entry[key]
        if s.startswith("builtin:") or "${" in s or Path(s).is_absolute():
            return
        candidate = (base_dir / s).resolve()
        if candidate.exists():
            entry[key] = str(candidate)

    block = data.get("data")
    if isinstance(block, dict):
        for split in ("train", "eval"):
            sources = block.get(split)
            if isinstance(sources, list):
                for src in sources:
                    anchor(src, "source")
    patches = data.get("patches")
    if isinstance(patches, list):
        for patch in patches:
            anchor(patch, "calibration_data")
    model = data.get("model")
    if isinstance(model, dict):  # a .gguf file or a .jinja chat template beside the recipe
        if isinstance(model.get("path"), str) and model["path"].lower().endswith(".gguf"):
            anchor(model, "path")
        if isinstance(model.get("chat_template"), str) and model["chat_template"].endswith(".jinja"):
            anchor(model, "chat_template")


def resolve_extends(path: Path, stack: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[Path]]:
    """Read ``path`` and everything it extends, merged parent-first. Cycles are errors."""
    path = path.resolve()
    if path in stack:
        cycle = " -> ".join(p.name for p in (*stack, path))
        raise RecipeError(Problem("extends", f"extends cycle: {cycle}", "remove one of the extends"))
    data = read_yaml(path)
    _anchor_data_paths(data, path.parent)
    parent = data.pop("extends", None)
    if parent is None:
        return data, [path]
    if not isinstance(parent, str) or not parent.strip():
        raise RecipeError(Problem(f"{path.name}: extends", "must be a relative path or builtin:NAME"))
    parent_path = resolve_builtin_recipe(parent) if parent.startswith("builtin:") else path.parent / parent
    if not parent_path.is_file():
        raise RecipeError(Problem(f"{path.name}: extends", f"file not found: {parent_path}"))
    base, chain = resolve_extends(parent_path, (*stack, path))
    return deep_merge(base, data), [*chain, path]


def interpolate_env(data: Any, where: str = "") -> tuple[Any, list[Problem]]:
    """Replace ``${env:VAR}`` and ``${env:VAR:-default}`` in every string value."""
    problems: list[Problem] = []
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out[k], p = interpolate_env(v, f"{where}.{k}" if where else str(k))
            problems += p
        return out, problems
    if isinstance(data, list):
        out_list = []
        for i, v in enumerate(data):
            item, p = interpolate_env(v, f"{where}[{i}]")
            out_list.append(item)
            problems += p
        return out_list, problems
    if isinstance(data, str) and "${env:" in data:

        def sub(m: re.Match[str]) -> str:
            value = os.environ.get(m.group(1), m.group(2))
            if value is None:
                problems.append(
                    Problem(where, f"environment variable {m.group(1)} is not set",
                            f"export {m.group(1)}=... or write ${{env:{m.group(1)}:-default}}")
                )
                return m.group(0)
            return value

        return ENV_PATTERN.sub(sub, data), problems
    return data, problems


# --- the schema, walked by dotted key -------------------------------------------------------


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


def _keeps_string(ann: Any) -> bool:
    ann = _unwrap(ann)
    if ann is str:
        return True
    if typing.get_origin(ann) is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(ann))
    return False


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], list[Problem]]:
    """Apply ``dotted.key=value`` overrides, typing each value by the schema at that key.

    A string field keeps the raw text (``--set model.path=123`` stays "123"); anything else is
    parsed as YAML (``--set train.epochs=3`` is the int 3, ``--set peft=null`` removes PEFT).
    """
    data = copy.deepcopy(data)
    problems: list[Problem] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Problem(f"--set {item}", "expected dotted.key=value", "e.g. --set train.epochs=3"))
            continue
        parts: list[Any] = [int(p) if p.isdigit() else p for p in key.split(".")]
        ann, _ = schema_at(parts, data)
        if _keeps_string(ann):
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                value = raw
        node: Any = data
        ok = True
        for j, part in enumerate(parts[:-1]):
            if isinstance(node, list) and isinstance(part, int):
                if part >= len(node):
                    problems.append(Problem(f"--set {key}", f"index {part} out of range (list has {len(node)} items)"))
                    ok = False
                    break
                node = node[part]
            elif isinstance(node, dict):
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
            else:
                problems.append(Problem(f"--set {key}", f"{'.'.join(map(str, parts[: j + 1]))} is not a mapping"))
                ok = False
                break
        if not ok:
            continue
        last = parts[-1]
        if isinstance(node, list) and isinstance(last, int) and last < len(node):
            node[last] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            problems.append(Problem(f"--set {key}", "cannot set this key"))
    return data, problems


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedRecipe:
    """Read, merge, interpolate, override and validate a recipe; raise RecipeError with every problem."""
    path = Path(path)
    if str(path).startswith("builtin:"):
        path = resolve_builtin_recipe(str(path))
    data, chain = resolve_extends(path)
    data.pop("tunelab_lock", None)  # lock files carry provenance next to the recipe
    data, problems = apply_overrides(data, list(overrides))
    data, env_problems = interpolate_env(data)
    problems += env_problems
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems += validation_problems(exc, data)
        recipe = None
    if problems or recipe is None:
        raise RecipeError(problems, title=f"{path}: {len(problems)} problem{'s' if len(problems) != 1 else ''}")
    return LoadedRecipe(recipe=recipe, path=path.resolve(), data=data, overrides=list(overrides), chain=chain)
