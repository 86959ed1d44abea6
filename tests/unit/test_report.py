"""RUN/report.html: the plots embedded, the counts and evals shown, everything escaped, nothing fetched."""

from __future__ import annotations

import json
import re

import pytest

from plot_pixels import bar_heights, fit, png_images
from tunelab.errors import UserError
from tunelab.report import run_status, write_report


# each series a shape of its own, so that a plot showing another series' numbers (or none) is told apart
SERIES = {
    "loss": lambda s: 3.0 - s / 10 + 0.25 * (s % 2),  # a falling zigzag
    "learning_rate": lambda s: 1e-4 * (s / 4 if s <= 4 else (12 - s) / 8),  # warm-up, then decay
    "grad_norm": lambda s: 1.0 + s % 3,  # a saw
    "rewards/margins": lambda s: (s / 7) ** 2,  # a convex rise
}


def _series(root) -> dict[str, list[tuple[float, float]]]:
    rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    return {k: [(r["step"], r[k]) for r in rows] for k in SERIES}


def _run(tmp_path, final: bool = True):
    root = tmp_path / "run"
    root.mkdir()
    rows = [{"step": s, **{k: f(s) for k, f in SERIES.items()}} for s in range(1, 11)]
    (root / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "recipe.lock.yaml").write_text("model: {path: builtin:tiny-llama}\nnote: '<script>alert(1)</script>'\n")
    (root / "summary.json").write_text(json.dumps({
        "global_step": 10, "train_loss": {"first": 2.9, "last": 2.0, "logged_steps": 10},
        "eval_before": {"perplexity": 1633.0}, "eval_after": {"perplexity": 2.52}}))
    (root / "data_report.json").write_text(json.dumps({
        "max_length": 100, "on_overflow": "drop", "train_rows": 1191, "eval_rows": 0, "eval": [],
        "train": [{"source": "data/x.jsonl", "rows": 1200, "used": 1191, "truncated": 0, "dropped_overflow": 7,
                   "dropped_no_labels": 1, "skipped_bad": 1, "bad_examples": ["row 17: missing 'messages'"],
                   "tokens": 5000, "label_tokens": 2000, "max_tokens": 140,
                   "length_histogram": [5, 100, 300, 400, 200, 100, 50, 20, 10, 6, 7]}]}))
    if final:
        (root / "final").mkdir()
    return root


def test_report_has_plots_counts_evals_and_fetches_nothing(tmp_path):
    root = _run(tmp_path)
    page = write_report(root).read_text(encoding="utf-8")
    images = re.findall(r"<img [^>]*src='data:image/png;base64,[A-Za-z0-9+/=]+'", page)
    assert len(images) == 5  # loss, learning_rate, grad_norm, rewards/margins, the length histogram
    for name in ("loss", "learning_rate", "grad_norm", "rewards/margins", "train length histogram"):
        assert f"alt='{name}'" in page

    # each plot draws the run's own numbers, read back from the PNG's pixels (tests/plot_pixels.py, not the plotting
    # code): R^2 of the curve against its series of metrics.jsonl measured >= 0.991, against any other <= 0.094
    pngs, series = png_images(page), _series(root)
    for name in SERIES:
        assert (r2 := fit(pngs[name], series[name])) > 0.97, (name, r2)
        for other in SERIES.keys() - {name}:
            assert (r2 := fit(pngs[name], series[other])) < 0.5, (name, other, r2)
    one_off = [(s, v + 0.8 if s == 5 else v) for s, v in series["loss"]]  # one number of another run
    assert (r2 := fit(pngs["loss"], one_off)) < 0.9, r2  # (measured 0.70; 0.89 for +0.4)
    # the histogram's bars stand in the data report's proportions (to a pixel: measured heights 3, 46, ..., 183)
    hist = json.loads((root / "data_report.json").read_text())["train"][0]["length_histogram"]
    bars = bar_heights(pngs["train length histogram"], [(0x4C, 0x72, 0xB0), (0xC4, 0x4E, 0x52)])
    assert len(bars) == len(hist)
    scale = max(bars) / max(hist)
    assert all(abs(b - h * scale) <= 1.5 for b, h in zip(bars, hist)), (bars, hist)
    for count in ("1200", "1191", "<td>7</td>", "row 17: missing"):
        assert count in page
    assert "1633" in page and "2.52" in page and "status: <b>done</b>" in page
    assert "<script>" not in page and "&lt;script&gt;" in page  # the lock is shown escaped
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//|url\(|@import""", page)  # nothing external


def _series(root) -> dict[str, list[tuple[float, float]]]:
    rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    return {k: [(r["step"], r[k]) for r in rows] for k in SERIES}


def test_status_and_not_a_run(tmp_path):
    root = _run(tmp_path, final=False)
    from tunelab.runs import RunDir

    assert run_status(RunDir(root)) == "failed"
    (root / "checkpoint-5").mkdir()
    assert run_status(RunDir(root)) == "incomplete"
    (root / "preempted.json").write_text("{}")
    assert run_status(RunDir(root)) == "preempted"
    with pytest.raises(UserError, match="not a tunelab run directory"):
        write_report(tmp_path / "nothing")


def test_report_cli(run_cli, tmp_path):
    root = _run(tmp_path)
    rc, stdout, _ = run_cli("report", root)
    assert rc == 0 and (root / "report.html").is_file() and "report.html" in stdout
    rc, _, stderr = run_cli("report", tmp_path / "nothing")
    assert rc == 2 and "not a tunelab run directory" in stderr


def _lock(root, lr: float, sha: str = "aa") -> None:
    (root / "recipe.lock.yaml").write_text(
        "model: {path: builtin:tiny-llama}\nmethod: {name: dpo, beta: 0.1}\n"
        f"train: {{learning_rate: {lr:.1e}, epochs: 1}}\n"
        "tunelab_lock:\n  created: x\n  versions: {torch: 2.13.0, trl: 1.16.0}\n  git_sha: abc\n"
        f"  data:\n  - {{split: train, source: data/x.jsonl, sha256: {sha}}}\n")


def test_runs_ls_and_diff(tmp_path, run_cli):
    from tunelab.report import diff_runs, list_runs

    a = _run(tmp_path)
    (tmp_path / "b").mkdir()
    b = _run(tmp_path / "b", final=False)
    _lock(a, 1e-4)
    _lock(b, 5e-5, sha="bb")
    summary = json.loads((b / "summary.json").read_text())
    summary["train_loss"]["last"] = 1.5
    (b / "summary.json").write_text(json.dumps(summary))
    rows = {r["run"]: r for r in list_runs(tmp_path)}
    assert rows[str(a)]["status"] == "done" and rows[str(b)]["status"] == "failed"
    assert rows[str(a)]["method"] == "dpo" and rows[str(a)]["train loss (last)"] == "2"
    assert rows[str(a)]["eval after"] == "perplexity 2.52"
    diff = diff_runs(a, b)
    assert diff["recipe"] == [("train.learning_rate", 1e-4, 5e-5)]  # only what differs: not epochs, not beta
    assert diff["data fingerprints"] == [("train data/x.jsonl", "aa", "bb")] and diff["library versions"] == []
    assert ("train_loss.last", 2.0, 1.5) in diff["final metrics"]
    assert all(k != "global_step" for k, _, _ in diff["final metrics"])
    rc, stdout, _ = run_cli("runs", "diff", a, b)
    assert rc == 0 and "learning_rate" in stdout and "epochs" not in stdout
    rc, stdout, _ = run_cli("runs", "ls", tmp_path)
    assert rc == 0 and "dpo" in stdout and "done" in stdout
    rc, _, stderr = run_cli("runs", "diff", a, tmp_path / "nothing")
    assert rc == 2 and "not a tunelab run directory" in stderr
