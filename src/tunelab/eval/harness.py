"""lm-evaluation-harness tasks on a model tunelab loaded: the checks before any weights load, the run, the scores.

lm-eval (``pip install "tunelab[lm-eval]"``) is optional and slow to import, so this module imports it
only inside the functions that need it. The model is the object ``load_for_inference`` returns (a run
dir, an adapter merged into its base, an MLA model...), handed to lm-eval's HF backend (``HFLM`` takes a
``PreTrainedModel`` instance and its tokenizer): lm-eval never loads weights of its own.

Indexing every task lm-eval ships (about 15k YAML files) takes seconds, too slow for ``tunelab validate``:
the names are indexed once per installed lm-eval and cached (``task_names``); a folder of the user's own
tasks (``include``) is small and is indexed each time.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from tunelab.errors import Problem, UserError, closest

INSTALL = 'pip install "tunelab[lm-eval]"'


def installed() -> bool:
    """Whether lm-eval can be imported (looked up without importing it)."""
    return importlib.util.find_spec("lm_eval") is not None


def parse_tasks(value: str, key: str = "--task") -> list[str]:
    """Task names from "arc_easy,hellaswag" (what follows ``lm-eval:``); a UserError naming ``key`` when empty."""
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise UserError(Problem(key, "no lm-eval task named", "e.g. --task lm-eval:arc_easy,hellaswag"))
    return names


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tunelab"


def _cached(cache: Path, stamp: str, index: Any) -> set[str]:
    """The names stored in ``cache`` when it was written for ``stamp``; else ``index()``, stored for next time
    (when the cache cannot be written, the index is simply rebuilt next time)."""
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached.get("stamp") == stamp:
            return set(cached["names"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    names = list(index())
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "names": names}), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError:
        pass
    return set(names)


def _task_manager(**kwargs: Any) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(**kwargs)


def builtin_task_names() -> set[str]:
    """The task, group and tag names lm-eval ships, indexed once per installed version and cached.

    The cache (``~/.cache/tunelab/lm_eval-<version>-tasks.json``) is keyed by the version and the folder
    of lm-eval's tasks, so an upgrade or another environment indexes again.
    """
    spec = importlib.util.find_spec("lm_eval")
    assert spec is not None and spec.origin is not None
    tasks_dir = str(Path(spec.origin).parent / "tasks")
    version = importlib.metadata.version("lm_eval")
    return _cached(_cache_dir() / f"lm_eval-{version}-tasks.json", tasks_dir,
                   lambda: _task_manager(include_defaults=True).all_tasks)


def include_task_names(include: str | Path) -> set[str]:
    """The task, group and tag names the YAML files under ``include`` define (lm-eval's own index of them).

    Importing lm-eval's indexer alone takes about a second, so the names are cached too, keyed by the folder and
    the path, size and modification time of every file in it: any edit, added or removed file indexes again.
    """
    folder = Path(include).resolve()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    stamp = json.dumps([str(folder), importlib.metadata.version("lm_eval")]
                       + [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    digest = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    return _cached(_cache_dir() / f"lm_eval-include-{digest}.json", stamp,
                   lambda: _task_manager(include_path=str(include), include_defaults=False).all_tasks)


def task_problems(tasks: Sequence[str], include: str | Path | None, tasks_key: str, include_key: str,
                  numbered: bool = True) -> list[Problem]:
    """What is wrong with running ``tasks``: lm-eval missing, the include folder missing, an unknown task name.

    ``tasks_key``/``include_key`` name the recipe keys (or options) in the problems; ``numbered`` adds the
    index (``eval.lm_eval.tasks[1]``). Names found in ``include`` are checked first, so that a recipe whose
    tasks are all its own never indexes lm-eval's (seconds, the first time).
    """
    if not installed():
        return [Problem(tasks_key, "lm-eval is not installed", f"{INSTALL}, or remove the lm-eval tasks")]
    if include is not None and not Path(include).is_dir():  # its tasks cannot be checked: this first
        return [Problem(include_key, f"{include} is not a folder", "a folder of lm-eval task YAMLs")]
    problems: list[Problem] = []
    known = include_task_names(include) if include is not None else set()
    unknown = [(i, t) for i, t in enumerate(tasks) if t not in known]
    if unknown:
        known |= builtin_task_names()
    for i, name in unknown:
        if name in known:
            continue
        guess = closest(name, known)
        where = f"{tasks_key}[{i}]" if numbered else tasks_key
        what = f"unknown lm-eval task {name!r}" + (f"; did you mean {guess!r}?" if guess else "")
        problems.append(Problem(where, what, "see `lm-eval ls tasks`"
                                + ("" if include else f", or add a folder of your own with {include_key}")))
    return problems


def _anchor(value: Any, base: Path) -> Any:
    """A data_files value (a path, a list of them, or split -> either) with relative paths that exist under
    ``base`` made absolute; anything else (absolute, a URL, nothing there) is left as written."""
    if isinstance(value, str):
        if os.path.isabs(value) or "://" in value or not glob.glob(str(base / value)):
            return value
        return str(base / value)
    if isinstance(value, list):
        return [_anchor(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _anchor(v, base) for k, v in value.items()}
    return value


def anchor_task_data(manager: Any, include: str | Path) -> list[str]:
    """Read relative ``dataset_kwargs`` paths (data_files, data_dir) of the tasks under ``include`` relative to
    their YAML, as the user meant; lm-eval alone hands them to ``datasets`` as they are, relative to the
    current directory. Returns the names of the tasks changed.

    The index entry of such a task gets its config fully loaded (includes and ``!function`` resolved, as
    lm-eval would when building it) with the paths made absolute, in place of its YAML path.
    """
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    root = Path(include).resolve()
    changed = []
    for name, entry in manager.task_index.items():
        path = entry.yaml_path
        if path is None or entry.kind is not Kind.TASK or not Path(path).resolve().is_relative_to(root):
            continue
        kwargs = (entry.cfg or {}).get("dataset_kwargs") or {}
        base = Path(path).resolve().parent
        anchored = dict(kwargs)
        if "data_files" in kwargs:
            anchored["data_files"] = _anchor(kwargs["data_files"], base)
        if isinstance(kwargs.get("data_dir"), str) and not os.path.isabs(kwargs["data_dir"]) \
                and (base / kwargs["data_dir"]).is_dir():
            anchored["data_dir"] = str(base / kwargs["data_dir"])
        if anchored == kwargs:
            continue
        cfg = load_yaml(path, resolve_func=True)
        cfg["dataset_kwargs"] = {**(cfg.get("dataset_kwargs") or {}), **anchored}
        entry.cfg, entry.yaml_path = cfg, None
        changed.append(name)
    return changed


def evaluate(model: Any, tokenizer: Any, tasks: Sequence[str], include: str | Path | None = None,
             limit: int | None = None, batch_size: int = 8, num_fewshot: int | None = None) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on a loaded model; lm-eval's results dict (per-sample logs left out).

    Only the include folder is indexed when every task is found there; lm-eval's own tasks otherwise.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = None
    if include is not None:
        manager = TaskManager(include_path=str(include), include_defaults=False)
        if not all(t in manager.all_tasks for t in tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=str(include) if include is not None else None)
    if include is not None:
        anchor_task_data(manager, include)
    hf_log = logging.getLogger("lm_eval.models.huggingface")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)  # its warnings about a model passed as an object are about our intended use
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        hf_log.setLevel(level)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, batch_size=batch_size, log_samples=False)
    if results is None:  # only rank 0 of a multi-process lm-eval gets results; ours runs in one process
        raise RuntimeError("lm-eval returned no results")
    results.pop("samples", None)
    return results


def scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results: ``acc``, ``acc_stderr``, ...; a metric measured after a
    filter other than ``none`` keeps its ``metric,filter`` name; ``samples`` is how many documents were scored."""
    out: dict[str, dict[str, float]] = {}
    for task, row in results.get("results", {}).items():
        metrics: dict[str, float] = {}
        for key, value in row.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # the alias, and stderrs lm-eval could not compute ("N/A")
            metric, filt = key.split(",", 1)
            metrics[metric if filt == "none" else key] = float(value)
        n = results.get("n-samples", {}).get(task, {})
        if "effective" in n:
            metrics["samples"] = n["effective"]
        out[task] = metrics
    return out


def format_table(task_scores: dict[str, dict[str, float]]) -> str:
    """A plain-text table: task, metric, value, stderr (one row per metric)."""
    rows = [("task", "metric", "value", "stderr")]
    for task, metrics in task_scores.items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or "_stderr," in metric or metric == "samples":
                continue
            err = metrics.get(f"{metric}_stderr") if "," not in metric else \
                metrics.get("{}_stderr,{}".format(*metric.split(",", 1)))
            rows.append((task, metric, f"{value:.4f}", f"{err:.4f}" if err is not None else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
