"""``tunelab validate``: everything that can be checked without loading weights.

1. schema (load.py: YAML, extends, overrides, pydantic) -- no torch import;
2. data: every source resolves and its first rows convert to the method's format;
3. the method's TRL config object is constructed from the recipe (catches a bad ``method.trl``);
4. the attention implementation can run on this machine;
5. patches fit the rest of the recipe and an MLA-converted model.path is loaded only in ways
   MLA supports (both before 3: no torch needed); patches fit the model's config (read without
   its weights).
All problems are collected and raised together.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from tunelab.errors import Problem, RecipeError, closest
from tunelab.recipe.load import LoadedRecipe, load_recipe


def trl_problems(loaded: LoadedRecipe) -> list[Problem]:
    """Build the method's TRL config the way training will, and report what it rejects."""
    from tunelab.methods import method_module

    recipe = loaded.recipe
    module = method_module(recipe.method)
    if not hasattr(module, "trl_config"):
        return []  # a trainer of our own (ppo): its fields are all in the schema
    trl = getattr(recipe.method, "trl", {}) or {}
    problems = []
    owned = getattr(module, "OWNED_TRL_FIELDS", set())
    for key in trl:
        if key in owned:
            problems.append(Problem(f"method.trl.{key}", "is set by tunelab from the recipe",
                                    "use the recipe's own key (train.*, data.*, model.*) instead"))
    if problems:
        return problems
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            module.trl_config(recipe, output_dir=tmp, report_to="none")
    except TypeError as exc:
        msg = str(exc)
        if "unexpected keyword argument" in msg and "'" in msg:
            bad = msg.split("'")[1]
            names = [f.name for f in dataclasses.fields(module.trl_config_class())]
            guess = closest(bad, names)
            problems.append(Problem(f"method.trl.{bad}", "unknown TRL config field",
                                    f"did you mean '{guess}'?" if guess else "see the TRL config docs"))
        else:
            problems.append(Problem("method.trl", msg))
    except ValueError as exc:
        problems.append(Problem("method.trl", f"TRL rejects the config: {exc}"))
    return problems


def report_to_problems(recipe: Any) -> list[Problem]:
    """Experiment trackers other than TensorBoard are used only when installed."""
    import importlib.util

    return [Problem("train.report_to", f"{name} is not installed", f"pip install {name}, or remove it")
            for name in recipe.train.report_to
            if name in ("wandb", "mlflow") and importlib.util.find_spec(name) is None]


def reward_column_problems(recipe: Any) -> list[Problem]:
    """Columns the built-in rewards read (e.g. ``answer``) must exist in the first row of each local source."""
    from tunelab.data.formats import BadRow, convert
    from tunelab.data.sources import iter_rows, resolve_source
    from tunelab.errors import DataError
    from tunelab.rewards import required_columns

    need = required_columns(recipe.method.rewards)
    problems = []
    for split in ("train", "eval"):
        for i, src in enumerate(getattr(recipe.data, split)):
            try:
                resolved = resolve_source(src.source, f"data.{split}[{i}].source")
                if not resolved.is_local:
                    continue
                for _, row in iter_rows(src, resolved, limit=1):
                    missing = need - set(convert(row, src))
                    if missing:
                        problems.append(Problem(f"data.{split}[{i}]", f"{resolved.label} has no column "
                                                f"{sorted(missing)[0]!r}, which a reward in method.rewards reads",
                                                "add the column, or set the reward's column: to one it has"))
            except (DataError, BadRow):
                continue  # reported by check_data
    return problems


def validate(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[LoadedRecipe, list[str]]:
    """Fully check a recipe without loading weights; (loaded recipe, notes) or RecipeError."""
    loaded = load_recipe(path, overrides)  # raises on schema problems, before heavy imports
    from tunelab.data.pipeline import check_data
    from tunelab.methods import method_module

    module = method_module(loaded.recipe.method)
    formats = getattr(module, "ACCEPTED_FORMATS", None)
    problems, notes = check_data(loaded.recipe, accepted_formats=formats)
    problems += report_to_problems(loaded.recipe)
    from tunelab.models.load import mla_checkpoint_problems

    problems += mla_checkpoint_problems(loaded.recipe)
    if loaded.recipe.patches:
        from tunelab.patches import patch_recipe_problems

        problems += patch_recipe_problems(loaded.recipe)
    if hasattr(module, "check_recipe"):
        problems += module.check_recipe(loaded.recipe)
    rewards = getattr(loaded.recipe.method, "rewards", None)
    if rewards:
        from tunelab.rewards import reward_problems

        found, reward_notes = reward_problems(rewards)
        problems += found
        notes += reward_notes
        problems += reward_column_problems(loaded.recipe)
    # Building the TRL config imports torch and TRL (seconds). Skip it when the answer is already
    # "fix these first", unless method.trl holds keys of its own that only TRL can check.
    if not problems or getattr(loaded.recipe.method, "trl", None):
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        problems += trl_problems(loaded)
        from tunelab.models.load import attn_problems

        problems += attn_problems(loaded.recipe.model)
    # Reading the model's config imports transformers: like the TRL config, only once the rest is right.
    if loaded.recipe.patches and not problems:
        from tunelab.models.load import load_config, missing_local_model
        from tunelab.patches import patch_problems

        config = load_config(loaded.recipe.model)
        if config is not None:
            problems += patch_problems(loaded.recipe, config)
        elif missing_local_model(loaded.recipe.model.path) is None:  # a missing run dir is noted below
            notes.append(f"patches not checked (offline): the config of {loaded.recipe.model.path} is not cached "
                         "here; they are checked again when the model loads")
    if problems:
        raise RecipeError(problems, title=f"{path}: {len(problems)} problem{'s' if len(problems) != 1 else ''}")
    from tunelab.models.load import missing_models

    # a note here (a chain's later recipes validate before the earlier runs exist); train stops on it
    notes += [str(m) for m in missing_models(loaded.recipe)]
    return loaded, notes
