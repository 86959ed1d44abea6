"""eval/harness.py: the checks of lm-eval tasks before any weights load (fast, cached), relative task data read
beside its YAML, and lm-eval's results reduced to {task: {metric: value}} and a table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tunelab.errors import UserError
from tunelab.eval import harness

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "lm_eval"


@pytest.fixture
def lm_eval():
    """lm-eval is in the dev extra: a skip where it is missing, a failure in CI (the tests must not pass by not
    running)."""
    if not harness.installed():
        if os.environ.get("CI"):
            pytest.fail('lm-eval is not installed (pip install -e ".[dev]")')
        pytest.skip('lm-eval is not installed (pip install "tunelab[lm-eval]")')


RESULTS = {  # the shape of lm-eval's simple_evaluate() results, trimmed
    "results": {
        "tinyfacts": {"alias": "tinyfacts", "acc,none": 0.45, "acc_stderr,none": 0.114, "acc_norm,none": 0.3,
                      "acc_norm_stderr,none": 0.105},
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.01,
                  "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": "N/A"},
    },
    "n-samples": {"tinyfacts": {"original": 20, "effective": 12}, "gsm8k": {"original": 1319, "effective": 1319}},
}


def test_scores_keep_metric_names_and_the_filter_when_there_is_one():
    got = harness.scores(RESULTS)
    assert got == {
        "tinyfacts": {"acc": 0.45, "acc_stderr": 0.114, "acc_norm": 0.3, "acc_norm_stderr": 0.105, "samples": 12},
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.01,
                  "exact_match,flexible-extract": 0.5, "samples": 1319},
    }


def test_table_has_a_row_per_metric_with_its_stderr():
    lines = harness.format_table(harness.scores(RESULTS)).splitlines()
    assert lines[0].split() == ["task", "metric", "value", "stderr"]
    rows = [line.split() for line in lines[1:]]
    assert rows == [["tinyfacts", "acc", "0.4500", "0.1140"], ["tinyfacts", "acc_norm", "0.3000", "0.1050"],
                    ["gsm8k", "exact_match,strict-match", "0.2500", "0.0100"],
                    ["gsm8k", "exact_match,flexible-extract", "0.5000", "-"]]


def test_parse_tasks():
    assert harness.parse_tasks("arc_easy, hellaswag,") == ["arc_easy", "hellaswag"]
    with pytest.raises(UserError, match="--task: no lm-eval task named"):
        harness.parse_tasks(" , ")


def test_not_installed_is_one_problem_with_the_install_line(monkeypatch):
    monkeypatch.setattr(harness, "installed", lambda: False)
    problems = harness.task_problems(["arc_easy"], None, "eval.lm_eval.tasks", "eval.lm_eval.include")
    assert [p.where for p in problems] == ["eval.lm_eval.tasks"]
    assert 'pip install "tunelab[lm-eval]"' in str(problems[0])


def test_a_missing_include_folder_is_named(lm_eval, tmp_path):
    problems = harness.task_problems(["tinyfacts"], tmp_path / "nope", "t", "eval.lm_eval.include")
    assert [p.where for p in problems] == ["eval.lm_eval.include"] and "is not a folder" in problems[0].what


def test_tasks_all_in_the_include_folder_never_index_lm_evals_own(lm_eval, monkeypatch):
    def index():
        raise AssertionError("indexed lm-eval's tasks")

    monkeypatch.setattr(harness, "builtin_task_names", index)
    assert harness.task_problems(["tinyfacts"], ASSETS, "t", "i") == []


def test_an_unknown_name_gets_a_did_you_mean(lm_eval, monkeypatch):
    monkeypatch.setattr(harness, "builtin_task_names", lambda: {"arc_easy", "arc_challenge", "hellaswag"})
    problems = harness.task_problems(["tinyfacts", "arc_eazy", "hellaswag", "zzz"], ASSETS, "eval.lm_eval.tasks", "i")
    assert [p.where for p in problems] == ["eval.lm_eval.tasks[1]", "eval.lm_eval.tasks[3]"]
    assert "did you mean 'arc_easy'?" in problems[0].what and "did you mean" not in problems[1].what


def test_builtin_names_come_from_the_cache_without_indexing(lm_eval, monkeypatch, tmp_path):
    """A cache for this lm-eval (version and tasks folder) is read instead of indexing ~15k YAML files; one
    written for another installation is not."""
    import importlib.metadata
    import importlib.util

    import lm_eval.tasks

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    origin = importlib.util.find_spec("lm_eval").origin
    cache = tmp_path / "tunelab" / f"lm_eval-{importlib.metadata.version('lm_eval')}-tasks.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"stamp": str(Path(origin).parent / "tasks"), "names": ["only_this"]}))

    class Indexed:
        def __init__(self, **_):
            self.all_tasks = ["indexed_task"]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Indexed)
    assert harness.builtin_task_names() == {"only_this"}
    cache.write_text(json.dumps({"stamp": "/elsewhere/lm_eval/tasks", "names": ["only_this"]}))
    assert harness.builtin_task_names() == {"indexed_task"}
    assert json.loads(cache.read_text())["names"] == ["indexed_task"]  # rewritten for this installation


def test_include_names_are_cached_until_a_file_in_the_folder_changes(lm_eval, monkeypatch, tmp_path):
    """Importing lm-eval's indexer takes about a second: a folder indexed once is read from the cache, and any
    edited, added or removed file in it indexes it again."""
    import lm_eval.tasks

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "a.yaml").write_text("task: first\n")
    calls = []

    class Indexed:
        def __init__(self, include_path=None, **_):
            calls.append(include_path)
            self.all_tasks = sorted(p.read_text().split()[1] for p in Path(include_path).glob("*.yaml"))

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Indexed)
    assert harness.include_task_names(folder) == {"first"} and len(calls) == 1
    assert harness.include_task_names(folder) == {"first"} and len(calls) == 1  # from the cache
    (folder / "a.yaml").write_text("task: renamed_it\n")
    assert harness.include_task_names(folder) == {"renamed_it"} and len(calls) == 2
    (folder / "b.yaml").write_text("task: second\n")
    assert harness.include_task_names(folder) == {"renamed_it", "second"} and len(calls) == 3
    (folder / "a.yaml").unlink()
    assert harness.include_task_names(folder) == {"second"} and len(calls) == 4


def _task_dir(root: Path, data_files: str) -> Path:
    (root / "mine").mkdir(parents=True)
    (root / "mine" / "rows.jsonl").write_text("".join(
        json.dumps({"context": f"c{i}", "choices": ["a", "b"], "label": i % 2}) + "\n" for i in range(5)))
    (root / "mine" / "mine.yaml").write_text(
        "task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + data_files + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\n")
    return root


def test_relative_task_data_is_read_beside_its_yaml(lm_eval, tmp_path, monkeypatch):
    """Run from another folder, a task YAML's relative data_files still finds its rows; without the anchoring
    lm-eval hands the path to datasets as written (relative to the current directory) and the task fails."""
    from lm_eval.tasks import TaskManager

    include = _task_dir(tmp_path / "tasks", "rows.jsonl")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    manager = TaskManager(include_path=str(include), include_defaults=False)
    with pytest.raises(Exception):  # noqa: B017 -- what datasets raises for a missing file varies by version
        manager.load(["mine"])

    manager = TaskManager(include_path=str(include), include_defaults=False)
    assert harness.anchor_task_data(manager, include) == ["mine"]
    task = manager.load(["mine"])["tasks"]["mine"]
    assert len(task.test_docs()) == 5


def test_absolute_and_missing_data_paths_are_left_as_written(lm_eval, tmp_path):
    from lm_eval.tasks import TaskManager

    include = _task_dir(tmp_path / "tasks", str(tmp_path / "tasks" / "mine" / "rows.jsonl"))
    manager = TaskManager(include_path=str(include), include_defaults=False)
    assert harness.anchor_task_data(manager, include) == []
    assert harness._anchor({"test": "not_here.jsonl", "x": ["hf://a/b"]}, tmp_path) == \
        {"test": "not_here.jsonl", "x": ["hf://a/b"]}
