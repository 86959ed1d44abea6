"""Load a recipe: YAML (safe_load) -> ``extends`` -> ``${env:VAR}`` -> ``--set`` overrides -> schema.

Turning pydantic's errors into problems with dotted keys is ``recipe/explain.py``.

Everything here is pure Python and pydantic: a broken recipe is reported before torch,
transformers or TRL is imported. All problems are collected and raised together as one
``RecipeError``, each naming the dotted key, what is wrong and, for a misspelt key, the
closest valid one.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tunelab.errors import Problem, RecipeError, closest
from tunelab.recipe.explain import keeps_string, schema_at, validation_problems
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

    Data sources (``data.train/eval[].source``), a patch's ``calibration_data`` and ``eval.lm_eval.include``.
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
    evaluation = data.get("eval")
    if isinstance(evaluation, dict):
        anchor(evaluation.get("lm_eval"), "include")
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
        if keeps_string(ann):
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
