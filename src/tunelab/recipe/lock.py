"""``recipe.lock.yaml``: the fully resolved recipe plus what is needed to reproduce the run.

The lock file is itself a recipe (``tunelab train runs/X/recipe.lock.yaml``); the provenance
sits under ``tunelab_lock``, which loading ignores: library versions, the git sha of the
working directory, the original recipe path and overrides, and a fingerprint of each dataset.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from tunelab.recipe.load import LoadedRecipe


LIBRARIES = ("tunelab", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers",
             "bitsandbytes", "deepspeed")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def git_sha(where: Path) -> str | None:
    """The commit of the git work tree holding ``where`` (suffix -dirty if it has changes), or None."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=where, capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def lock_document(loaded: "LoadedRecipe", data_fingerprints: list[dict[str, Any]],
                  chat_template: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = loaded.recipe.model_dump(mode="json")
    doc["tunelab_lock"] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe": str(loaded.path),
        "extends_chain": [str(p) for p in loaded.chain],
        "overrides": list(loaded.overrides),
        "versions": library_versions(),
        "git_sha": git_sha(Path.cwd()) or git_sha(loaded.path.parent),
        "data": data_fingerprints,
    }
    if chat_template:
        doc["tunelab_lock"]["chat_template"] = chat_template  # name + sha256 of the text the run rendered with
    return doc


def write_lock(path: Path, loaded: "LoadedRecipe", data_fingerprints: list[dict[str, Any]],
               chat_template: dict[str, Any] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Resolved by tunelab; `tunelab train` this file to reproduce the run.\n"
    text += yaml.safe_dump(lock_document(loaded, data_fingerprints, chat_template), sort_keys=False, allow_unicode=True)
    path.write_text(text, encoding="utf-8")


def read_lock_provenance(path: Path) -> dict[str, Any] | None:
    """The ``tunelab_lock`` block of a lock file, or None for an ordinary recipe."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return data.get("tunelab_lock") if isinstance(data, dict) else None
