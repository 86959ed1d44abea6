"""The shipped recipe library: ``tunelab recipes ls|show|cp``."""

from __future__ import annotations

from pathlib import Path

import yaml

from tunelab.errors import Problem, UserError
from tunelab.recipe.load import library_dir, resolve_builtin_recipe


def list_recipes() -> list[tuple[str, str]]:
    """(name, first comment line) of every shipped recipe; files starting with _ are bases."""
    lib = library_dir()
    out = []
    for path in sorted(lib.rglob("*.yaml")):
        if path.name.startswith("_"):
            continue
        first = next((line[1:].strip() for line in path.read_text(encoding="utf-8").splitlines()
                      if line.startswith("#")), "")
        out.append((str(path.relative_to(lib).with_suffix("")), first))
    return out


def copy_recipe(name: str, dest: Path) -> Path:
    """Copy a shipped recipe; a relative ``extends:`` is rewritten to ``builtin:`` so it still resolves."""
    src = resolve_builtin_recipe(name)
    target = dest / src.name if dest.is_dir() else dest
    if target.exists():
        raise UserError(Problem(str(target), "already exists", "choose another destination"))
    text = src.read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    parent = data.get("extends") if isinstance(data, dict) else None
    if isinstance(parent, str) and not parent.startswith("builtin:"):
        rel = (src.parent / parent).resolve().relative_to(library_dir().resolve()).with_suffix("")
        text = text.replace(f"extends: {parent}", f"extends: builtin:{rel}", 1)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return target
