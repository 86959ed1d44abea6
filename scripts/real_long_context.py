"""Row 4 of docs/real-models.md: SmolLM2-135M past its 8192 trained positions, six ways, without fine-tuning.

    OMP_NUM_THREADS=2 python scripts/real_long_context.py        # about 45 min on a 2-core CPU

For none, linear (PI), ntk, dynamic_ntk, ntk_by_parts and yarn at factor 2 (original length
8192), with no training:

- perplexity of the first 2k, 4k, 8k and 16k tokens of each document (the YaRN paper's protocol:
  one window per document from its first token; ``tunelab.eval.long_context.prefix_ppl``);
  the documents are text every Python install has, so nothing is downloaded or committed: the
  reference-manual topics of ``pydoc_data`` (English prose about Python) cut into consecutive
  16,384-token documents, and the source of two long standard-library modules;
- passkey retrieval at 8192 and 16384 tokens (``tunelab.eval.passkey.passkey_grid``: greedy,
  the same seeded keys for every method).

It writes ``results.json`` (after each method: ``--reuse`` skips methods already measured),
``table.md`` and plots into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import time
from pathlib import Path

METHODS = ["none", "linear", "ntk", "dynamic_ntk", "ntk_by_parts", "yarn"]
CODE_MODULES = ("argparse", "typing")


def documents(tok, length: int, prose: int, code: int) -> list[dict]:  # noqa: ANN001
    """``prose`` documents cut from the pydoc topics, then ``code`` standard-library modules, each ``length`` tokens."""
    import importlib
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    docs = [{"source": f"pydoc_data.topics tokens {i * length}..{(i + 1) * length}",
             "ids": ids[i * length : (i + 1) * length]} for i in range(prose)]
    if len(docs[-1]["ids"]) < length:
        raise SystemExit(f"the pydoc topics give {len(ids)} tokens, fewer than {prose} x {length}")
    for name in CODE_MODULES[:code]:
        path = inspect.getsourcefile(importlib.import_module(name))
        src = Path(path).read_text(encoding="utf-8")
        mod_ids = tok(src, add_special_tokens=False, verbose=False)["input_ids"]
        if len(mod_ids) < length:
            raise SystemExit(f"{path} has {len(mod_ids)} tokens, fewer than {length}")
        docs.append({"source": f"{name}.py (first {length} of {len(mod_ids)} tokens)", "ids": mod_ids[:length]})
    return docs


def patched(model, method: str, original: int, factor: float):  # noqa: ANN001, ANN201
    from tunelab.patches.rope import RopePatch, apply_rope

    m = copy.deepcopy(model)
    if method != "none":
        apply_rope(m, RopePatch(name="rope", method=method, factor=factor, original_max_position_embeddings=original))
    return m.eval()


def plot_by_position(results: dict, path: Path, trained: int, bucket: int = 512) -> None:
    """Mean NLL per position bucket, one line per method: where each one breaks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for method, r in results.items():
        nll = r["nll_by_position"]
        xs, ys = [], []
        for start in range(0, len(nll), bucket):
            part = nll[start : start + bucket]
            xs.append(start + len(part) / 2)
            ys.append(sum(part) / len(part))
        ax.plot(xs, ys, label=method, linewidth=1.2)
    ax.axvline(trained, color="grey", linestyle="--", linewidth=1, label=f"trained length {trained}")
    ax.set_xlabel(f"position (mean over {bucket}-token buckets)")
    ax.set_ylabel("NLL (nats), mean over documents")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(results: dict, lengths: list[int], pk_lengths: list[int]) -> str:
    head = ("| method | " + " | ".join(f"ppl @ {n}" for n in lengths) + f" | ppl {lengths[-1]} / {lengths[-2]} | "
            + " | ".join(f"passkey @ {n}" for n in pk_lengths) + " | seconds |")
    rows = [head, "|" + " --- |" * (len(lengths) + len(pk_lengths) + 3)]
    for method, r in results.items():
        p = {x["length"]: x["ppl"] for x in r["ppl"]}
        acc = r["passkey"]["mean_by_length"]
        rows.append(f"| {method} | " + " | ".join(f"{p[n]:.3f}" for n in lengths)
                    + f" | {p[lengths[-1]] / p[lengths[-2]]:.2f} | "
                    + " | ".join(f"{a:.2f}" for a in acc) + f" | {r['seconds']:.0f} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--out", default="runs/real-long-context")
    ap.add_argument("--original", type=int, default=8192)
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--lengths", default="2048,4096,8192,16384")
    ap.add_argument("--prose-docs", type=int, default=2)
    ap.add_argument("--code-docs", type=int, default=1)
    ap.add_argument("--passkey-lengths", default="8192,16384")
    ap.add_argument("--depths", default="0.2,0.5,0.8")
    ap.add_argument("--trials", type=int, default=1, help="passkeys per (length, depth) cell")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--reuse", action="store_true", help="keep the methods results.json already has")
    args = ap.parse_args()

    import torch

    from tunelab.eval.long_context import plot_ppl_vs_length, prefix_ppl
    from tunelab.eval.passkey import passkey_grid, plot_passkey
    from tunelab.models.inference import load_for_inference

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    pk_lengths = [int(x) for x in args.passkey_lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    store = out / "results.json"
    saved = json.loads(store.read_text()) if args.reuse and store.exists() else {}
    results: dict = saved.get("methods", {})
    base, tok = load_for_inference(args.model)
    docs = documents(tok, max(lengths), args.prose_docs, args.code_docs)
    setup = {"model": args.model, "original": args.original, "factor": args.factor, "lengths": lengths,
             "documents": [d["source"] for d in docs], "passkey_lengths": pk_lengths, "depths": depths,
             "trials_per_cell": args.trials, "threads": torch.get_num_threads()}
    print(f"[long-context] {len(docs)} documents of {max(lengths)} tokens: {setup['documents']}", flush=True)
    for method in args.methods.split(","):
        if method in results:
            print(f"[long-context] {method}: reused", flush=True)
            continue
        t0 = time.time()
        model = patched(base, method, args.original, args.factor)
        ppl = prefix_ppl(model, [d["ids"] for d in docs], lengths)
        t_ppl = time.time() - t0
        print(f"[long-context] {method}: " + ", ".join(f"ppl@{r['length']} {r['ppl']:.3f}" for r in ppl["results"])
              + f" ({t_ppl:.0f} s)", flush=True)
        grid = passkey_grid(model, tok, pk_lengths, depths, trials=args.trials, seed=7,
                            log=lambda m, method=method: print(f"[long-context] {method}: {m}", flush=True))
        results[method] = {"ppl": ppl["results"], "nll_by_position": ppl["nll_by_position"], "passkey": grid,
                           "seconds": time.time() - t0, "ppl_seconds": t_ppl}
        store.write_text(json.dumps({"setup": setup, "methods": results}, indent=1))
        del model
    text = table(results, lengths, pk_lengths)
    (out / "table.md").write_text(text)
    print(text)
    plot_ppl_vs_length({m: r["ppl"] for m, r in results.items()}, out / "ppl_vs_length.png",
                       trained_length=args.original)
    plot_by_position(results, out / "nll_by_position.png", args.original)
    plot_passkey({m: r["passkey"] for m, r in results.items()}, out / "passkey.png")
    for m, r in results.items():
        wrong = [c for c in r["passkey"]["cases"] if not c["correct"]]
        if wrong:
            print(f"[long-context] {m}: wrong answers " + "; ".join(
                f"{c['length']}@{c['depth']}: {c['passkey']} -> {c['answer']!r}" for c in wrong[:6]))
    print(f"[long-context] wrote {out}")


if __name__ == "__main__":
    main()
