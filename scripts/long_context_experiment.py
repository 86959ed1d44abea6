"""The long-context quickstart experiment: extend a model trained at L = 128 to 4L, five ways.

    tunelab train recipes/long-context/pretrain.yaml     # the model trained at L (about 2 min on CPU)
    python scripts/long_context_experiment.py            # about 10 min on a 2-core CPU

For each extension (none, linear/PI, ntk, dynamic_ntk, ntk_by_parts, yarn) it measures, on the
held-out documents ``builtin:long-context/long_eval``:
- the patched model as it is (no training): perplexity at L, 2L, 4L and passkey accuracy;
- the same after the short fine-tune of ``recipes/long-context/yarn.yaml`` at 4L (the recipe's
  patch swapped for each method; "none" fine-tunes at 4L without any scaling).
It writes ``results.json``, ``table.md`` and three plots into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ["none", "linear", "ntk", "dynamic_ntk", "ntk_by_parts", "yarn"]


def patch_of(method: str, original: int, factor: int) -> list[dict]:
    if method == "none":
        return []
    return [{"name": "rope", "method": method, "factor": factor, "original_max_position_embeddings": original}]


def load(path: str, method: str, original: int, factor: int):  # noqa: ANN201
    from tunelab.models.inference import load_for_inference
    from tunelab.patches.rope import RopePatch, apply_rope

    model, tok = load_for_inference(path)
    if method != "none" and getattr(model.config, "tunelab_rope", None) is None:
        apply_rope(model, RopePatch(**patch_of(method, original, factor)[0]), tok)
    return model.eval(), tok


def measure(model, tok, ids: list[int], lengths: list[int], depths: list[float], trials: int) -> dict:  # noqa: ANN001
    from tunelab.eval.long_context import ppl_vs_length
    from tunelab.eval.passkey import passkey_grid

    ppl = ppl_vs_length(model, ids, lengths, label="long_eval")
    grid = passkey_grid(model, tok, [lengths[0], lengths[-1]], depths, trials=trials, seed=7)
    grid.pop("cases")
    return {"ppl": ppl, "passkey": grid}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", default="runs/long-context-pretrain/final")
    ap.add_argument("--out", default="runs/long-context-experiment")
    ap.add_argument("--original", type=int, default=128)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=20000)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()

    import torch

    from tunelab.eval.long_context import plot_ppl_vs_length, text_token_ids
    from tunelab.eval.passkey import plot_passkey

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    L, s = args.original, args.factor
    lengths = [L, 2 * L, s * L]
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    _, tok = load(args.pretrained, "none", L, s)
    ids = text_token_ids("builtin:long-context/long_eval", tok, "text", max_tokens=args.max_tokens)
    results: dict[str, dict] = {}
    for method in args.methods.split(","):
        model, tok = load(args.pretrained, method, L, s)
        results[f"{method} (no training)"] = measure(model, tok, ids, lengths, depths, args.trials)
        run = out / f"ft-{method}"
        cmd = [sys.executable, "-m", "tunelab", "train", "recipes/long-context/yarn.yaml",
               "--set", f"model.path={args.pretrained}", "--set", f"patches={json.dumps(patch_of(method, L, s))}",
               "--set", f"train.output_dir={run}", "--set", "train.report_to=[none]"]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0:
            sys.exit(f"fine-tune for {method} failed:\n{proc.stderr[-3000:]}")
        model, tok = load(str(run / "final"), method, L, s)
        results[f"{method} + fine-tune at {s * L}"] = measure(model, tok, ids, lengths, depths, args.trials)
        results[f"{method} + fine-tune at {s * L}"]["train_seconds"] = round(time.time() - t0, 1)
        print(f"[experiment] {method}: done", flush=True)

    (out / "results.json").write_text(json.dumps(results, indent=2))
    head = f"| model | ppl @ {L} | ppl @ {2 * L} | ppl @ {s * L} | ppl {s * L} / {L} | passkey @ {L} | passkey @ {s * L} |"
    rows = [head, "|" + " --- |" * 7]
    for label, r in results.items():
        p = {x["length"]: x["ppl"] for x in r["ppl"]}
        acc = r["passkey"]["mean_by_length"]
        rows.append(f"| {label} | {p[L]:.3f} | {p[2 * L]:.3f} | {p[s * L]:.3f} | {p[s * L] / p[L]:.2f} | "
                    f"{acc[0]:.2f} | {acc[-1]:.2f} |")
    (out / "table.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    for tag, keep in (("untrained", "no training"), ("finetuned", "fine-tune")):
        plot_ppl_vs_length({k: v["ppl"] for k, v in results.items() if keep in k},
                           out / f"ppl_vs_length_{tag}.png", trained_length=L)
    plot_passkey({k.split(" ")[0]: v["passkey"] for k, v in results.items() if "fine-tune" in k},
                 out / "passkey.png")  # the fine-tuned models, titled by method
    print(f"[experiment] wrote {out}")


if __name__ == "__main__":
    main()
