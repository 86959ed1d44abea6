"""RUN/report.html: one self-contained page to read a run by, instead of its JSON files.

Status and final metrics, a plot of every series the method logged (loss, learning rate, grad norm,
rewards, margins, KL, accuracies, eval metrics), eval before -> after, the data report (rows used,
truncated, dropped, skipped, and the length histogram) and the recipe lock. Plots are PNGs embedded
as data: URIs and the styles are inline: the page fetches nothing, so it opens offline, as an
e-mail attachment, or from a cluster's scratch disk. Everything read from files is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from tunelab.errors import Problem, UserError
from tunelab.runs import RunDir

_SKIP = {"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second",
         "num_tokens", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "time"}
_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
        "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}pre{background:#f7f7f7;padding:1em;"
        "overflow:auto;font-size:12px}.warn{background:#fff3cd;padding:.5em}.plots{display:flex;flex-wrap:wrap;gap:8px}.plots img{width:360px}")


def run_status(run: RunDir) -> str:
    """done | degraded | diverged | nonfinite | preempted | incomplete (checkpoints, no final/) | failed (nothing
    saved) | not started; "done (warnings)" when a finished run was marked (train.on_divergence: warn)."""
    if (run.root / "preempted.json").is_file():
        return "preempted"
    summary = json.loads(run.summary.read_text()) if run.summary.is_file() else {}
    status = summary.get("status")
    if status and status != "done":
        return str(status)
    if run.final.is_dir() and run.summary.is_file():
        return "done (warnings)" if summary.get("warnings") else "done"
    if run.last_checkpoint() is not None:
        return "incomplete"
    return "failed" if run.metrics.is_file() else "not started"


def _series(metrics: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for m in metrics:
        step = m.get("step")
        if step is None:
            continue
        for k, v in m.items():
            if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, []).append((float(step), float(v)))
    return {k: v for k, v in out.items() if len(v) >= 2}


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(series: dict[str, list[tuple[float, float]]], data: dict[str, Any] | None) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for name, points in series.items():
        fig, ax = plt.subplots(figsize=(4.5, 3), dpi=90)
        ax.plot(*zip(*points), ".-" if len(points) < 30 else "-")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out.append((name, _png(fig)))
        plt.close(fig)
    for split in ("train", "eval"):
        for src in (data or {}).get(split) or []:
            hist = src.get("length_histogram")
            if not hist:
                continue
            width = data["max_length"] / 10  # type: ignore[index]
            labels = [f"{int(i * width)}" for i in range(10)] + [f">{data['max_length']}"]  # type: ignore[index]
            fig, ax = plt.subplots(figsize=(4.5, 3), dpi=90)
            ax.bar(range(len(hist)), hist, color=["#4c72b0"] * 10 + ["#c44e52"])
            ax.set_xticks(range(len(hist)), labels, rotation=60, fontsize=7)
            ax.set_title(f"{split} lengths (tokens): {src.get('source')}", fontsize=8)
            ax.set_ylabel("rows")
            fig.tight_layout()
            out.append((f"{split} length histogram", _png(fig)))
            plt.close(fig)
    return out


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_report(root: Path | str) -> Path:
    """Write RUN/report.html and return its path."""
    run = RunDir(Path(root))
    if not run.lock.is_file() and not run.metrics.is_file():
        raise UserError(Problem("RUN", f"{run.root} is not a tunelab run directory (no recipe.lock.yaml, no "
                                "metrics.jsonl)", "give the train.output_dir of a run"))
    summary = _read_json(run.summary) or {}
    data = _read_json(run.root / "data_report.json")
    metrics = run.read_metrics() if run.metrics.is_file() else []
    status = run_status(run)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(run.root.name)}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(run.root.name)}</h1>",
             f"<p>status: <b>{status}</b>; global step {html.escape(str(summary.get('global_step', '?')))}; "
             f"processes {html.escape(str(summary.get('processes', '?')))}</p>"]
    if summary.get("stopped"):  # diverged, non-finite: why the run stopped
        parts.append(f"<p class='warn'><b>stopped:</b> {html.escape(str(summary['stopped']))}</p>")
    for warning in summary.get("warnings") or []:  # on_divergence: warn, or a far worse held-out evaluation
        parts.append(f"<p class='warn'><b>warning:</b> {html.escape(str(warning))}</p>")
    finals = [[k, v.get("first"), v.get("last"), v.get("logged_steps")] for k, v in summary.items()
              if isinstance(v, dict) and {"first", "last"} <= set(v)]
    if finals:
        parts += ["<h2>Training</h2>", _table(["series", "first 10% of steps", "last 10%", "logged steps"], finals)]
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    if before or after:
        keys = [k for k in {**before, **after} if isinstance((after or before).get(k), (int, float))]
        parts += ["<h2>Held-out evaluation</h2>",
                  _table(["metric", "before", "after"], [[k, before.get(k, ""), after.get(k, "")] for k in keys])]
    if summary.get("lm_eval"):
        rows = [[t, m, v] for t, ms in summary["lm_eval"].items() for m, v in ms.items() if isinstance(v, (int, float))]
        parts += ["<h2>lm-evaluation-harness</h2>", _table(["task", "metric", "value"], rows)]
    plots = _plots(_series(metrics), data)
    if plots:
        parts.append("<h2>Plots</h2><div class='plots'>" + "".join(
            f"<img alt='{html.escape(n)}' title='{html.escape(n)}' src='{uri}'>" for n, uri in plots) + "</div>")
    if data:
        rows = [[split, s.get("source"), s.get("rows"), s.get("used"), s.get("truncated"), s.get("dropped_overflow"),
                 s.get("dropped_no_labels"), s.get("skipped_bad"), s.get("tokens"), s.get("label_tokens"),
                 s.get("max_tokens")] for split in ("train", "eval") for s in data.get(split) or []]
        parts += [f"<h2>Data</h2><p>max_length {html.escape(str(data.get('max_length')))}, on_overflow "
                  f"{html.escape(str(data.get('on_overflow')))}</p>",
                  _table(["split", "source", "rows", "used", "truncated", "dropped (too long)",
                          "dropped (no response tokens)", "skipped (bad)", "tokens", "trained tokens", "longest"], rows)]
        bad = [b for split in ("train", "eval") for s in data.get(split) or [] for b in s.get("bad_examples") or []]
        if bad:
            parts.append("<pre>" + html.escape("\n".join(bad[:20])) + "</pre>")
    if run.lock.is_file():
        parts += ["<h2>Recipe lock</h2>", "<pre>" + html.escape(run.lock.read_text(encoding="utf-8")) + "</pre>"]
    parts.append("</body></html>")
    out = run.root / "report.html"
    tmp = out.with_name("report.html.partial")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(out)
    return out


# ------------------------------------------------------------------------------ tunelab runs ls / diff

def _is_run(p: Path) -> bool:
    return (p / "recipe.lock.yaml").is_file() or (p / "metrics.jsonl").is_file()


def _lock(run: RunDir) -> dict[str, Any]:
    import yaml

    try:
        return yaml.safe_load(run.lock.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _final_metric(summary: dict[str, Any]) -> str:
    after = summary.get("eval_after") or {}
    for k, v in after.items():
        if isinstance(v, (int, float)) and k != "tokens":
            return f"{k} {v:.4g}"
    return ""


def run_row(root: Path) -> dict[str, Any]:
    """One line of `tunelab runs ls`: name, method, base model, status, step, last train loss, eval after."""
    run = RunDir(root)
    lock, summary = _lock(run), _read_json(run.summary) or {}
    loss = (summary.get("train_loss") or {}).get("last")
    return {"run": str(root), "method": (lock.get("method") or {}).get("name", "?"),
            "base model": (lock.get("model") or {}).get("path", "?"), "status": run_status(run),
            "step": summary.get("global_step", ""), "train loss (last)": f"{loss:.4g}" if loss is not None else "",
            "eval after": _final_metric(summary)}


def list_runs(where: Path) -> list[dict[str, Any]]:
    """The runs in ``where`` (its subfolders, two levels deep, or ``where`` itself), oldest first."""
    if not where.is_dir():
        raise UserError(Problem("DIR", f"{where} is not a folder", "give the folder your runs are in (default ./runs)"))
    found = [where] if _is_run(where) else sorted(
        {p for p in [*where.glob("*"), *where.glob("*/*")] if p.is_dir() and _is_run(p)},
        key=lambda p: p.stat().st_mtime)
    return [run_row(p) for p in found]


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: obj}


def diff_runs(a: Path, b: Path) -> dict[str, list[tuple[str, Any, Any]]]:
    """What differs between two runs: resolved recipe, library versions, data fingerprints, final metrics."""
    for p in (a, b):
        if not _is_run(p):
            raise UserError(Problem("RUN", f"{p} is not a tunelab run directory (no recipe.lock.yaml, no "
                                    "metrics.jsonl)", "give two train.output_dir folders"))
    la, lb = _lock(RunDir(a)), _lock(RunDir(b))
    meta_a, meta_b = la.pop("tunelab_lock", {}) or {}, lb.pop("tunelab_lock", {}) or {}

    def data(meta: dict[str, Any]) -> dict[str, Any]:
        return {f"{d.get('split')} {d.get('source')}": d.get("sha256") for d in meta.get("data") or []}

    def versions(meta: dict[str, Any]) -> dict[str, Any]:
        return {**(meta.get("versions") or {}), "git_sha": meta.get("git_sha")}

    def metrics(root: Path) -> dict[str, Any]:
        flat = _flatten(_read_json(RunDir(root).summary) or {})
        return {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def differ(x: dict[str, Any], y: dict[str, Any]) -> list[tuple[str, Any, Any]]:
        return [(k, x.get(k, "-"), y.get(k, "-")) for k in sorted(set(x) | set(y), key=str) if x.get(k) != y.get(k)]

    return {"recipe": differ(_flatten(la), _flatten(lb)), "library versions": differ(versions(meta_a),
                                                                                      versions(meta_b)),
            "data fingerprints": differ(data(meta_a), data(meta_b)), "final metrics": differ(metrics(a), metrics(b))}
