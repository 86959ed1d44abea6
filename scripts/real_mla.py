"""Row 5 of docs/real-models.md: SmolLM2-135M (30 layers, 9 query / 3 KV heads of 64) converted to MLA.

    OMP_NUM_THREADS=2 python scripts/real_mla.py          # about 30 min on a 2-core CPU

At the MHA2MLA paper's settings for its SmolLM-135M model (a latent of d_kv = 32, 16 and 8 per
KV head, i.e. kv_lora_rank 96, 48 and 24; 8 rotary key dims per KV head chosen by 2-norm;
joint SVD of keys and values), it measures:

- KV-cache bytes per token, measured on the cache object after generation
  (``tunelab.eval.kv_cache.kv_cache_report``) against the config's prediction;
- perplexity on prose nobody trains on (the ``pydoc_data`` reference-manual topics that every
  Python install has, windows of 2048 tokens) for the original model and for each converted one;
- healing at ``recipes/real/mla-heal.yaml``'s rank (``tunelab train``, full fine-tune on bundled
  chat data, ``--steps`` steps), and a control: the same fine-tune without the conversion, so
  that what healing recovers is compared with what the extra training alone does. For both, the
  run's own held-out perplexity on chat (before -> after) and the prose perplexity after.

It writes ``results.json`` (``--reuse`` keeps what is there) and ``table.md`` into ``--out``.
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
RECIPE = "recipes/real/mla-heal.yaml"
D_KV = (32, 16, 8)  # the paper's latent per KV head for its 135M model


def prose_ids(tok, tokens: int) -> list[int]:  # noqa: ANN001
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return tok(text, add_special_tokens=False, verbose=False)["input_ids"][:tokens]


def converted(overrides: list[str]):  # noqa: ANN201
    """The recipe's base model with its patch applied exactly as ``tunelab train`` does, before training."""
    from tunelab.models.load import load_model, load_tokenizer
    from tunelab.patches import apply_patches
    from tunelab.recipe.load import load_recipe

    recipe = load_recipe(REPO / RECIPE, overrides).recipe
    model = load_model(recipe.model)
    records = apply_patches(model, recipe, load_tokenizer(recipe.model))
    return model.eval(), records[0]


def run_summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/real-mla")
    ap.add_argument("--tokens", type=int, default=16384, help="prose tokens for perplexity")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=80, help="healing steps (the recipe's batch and length)")
    ap.add_argument("--d-kv", default=",".join(map(str, D_KV)))
    ap.add_argument("--reuse", action="store_true")
    args = ap.parse_args()

    import torch

    from tunelab.eval.kv_cache import kv_cache_report
    from tunelab.eval.long_context import ppl_vs_length
    from tunelab.models.inference import load_for_inference

    torch.manual_seed(0)
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.json"
    res: dict = json.loads(store.read_text()) if args.reuse and store.exists() else {}
    save = lambda: store.write_text(json.dumps(res, indent=1) + "\n")  # noqa: E731

    def ppl(model) -> float:  # noqa: ANN001
        return ppl_vs_length(model.eval(), ids, [args.length])[0]["ppl"]

    base, tok = load_for_inference("builtin:smollm2-135m-instruct")
    ids = prose_ids(tok, args.tokens)
    res.setdefault("setup", {"prose_tokens": len(ids), "window": args.length, "recipe": RECIPE,
                             "threads": torch.get_num_threads()})
    if "original" not in res:
        t0 = time.time()
        res["original"] = {"ppl": ppl(base), "cache": kv_cache_report(base, [64, 256]),
                           "seconds": time.time() - t0}
        save()
    print(f"[mla] original: ppl {res['original']['ppl']:.3f}, "
          f"{res['original']['cache']['bytes_per_token']} bytes/token", flush=True)
    del base
    res.setdefault("converted", {})
    for d in (int(x) for x in args.d_kv.split(",")):
        key = str(d)
        if key in res["converted"]:
            continue
        t0 = time.time()
        model, record = converted([f"patches.0.kv_lora_rank={3 * d}"])
        t_convert = time.time() - t0
        res["converted"][key] = {"kv_lora_rank": 3 * d, "ppl": ppl(model), "cache": kv_cache_report(model, [64, 256]),
                                 "convert_seconds": t_convert, "record": record}
        save()
        r = res["converted"][key]
        print(f"[mla] d_kv {d} (rank {3 * d}): ppl {r['ppl']:.3f}, {r['cache']['bytes_per_token']} bytes/token "
              f"(measured matches: {r['cache']['all_match']}), conversion {t_convert:.0f} s", flush=True)
        del model

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name, extra in (("healed", []), ("control", ["--set", "patches=[]"])):
        if name in res:
            continue
        run = out / name
        cmd = [sys.executable, "-m", "tunelab", "train", RECIPE, "--set", f"train.output_dir={run}",
               "--set", f"train.max_steps={args.steps}", "--set", "train.report_to=[none]", *extra]
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=REPO, env=env)
        seconds = time.time() - t0
        model, _ = load_for_inference(str(run / "final"))
        summary = run_summary(run)
        res[name] = {"steps": args.steps, "seconds": seconds, "prose_ppl": ppl(model), "summary_eval": {
            k: v for k, v in summary.items() if "eval" in k or "ppl" in k or "perplexity" in k},
            "cache": kv_cache_report(model, [64, 256])}
        save()
        print(f"[mla] {name}: prose ppl {res[name]['prose_ppl']:.3f} after {args.steps} steps ({seconds:.0f} s)",
              flush=True)
        del model

    o = res["original"]
    lines = [f"Prose perplexity: {res['setup']['prose_tokens']} tokens of pydoc_data topics in windows of "
             f"{res['setup']['window']}.", "",
             "| model | kv_lora_rank | KV cache bytes/token (fp32, measured) | vs original | prose ppl |",
             "|---|---|---|---|---|",
             f"| original (GQA, 3 KV heads x 64) | - | {o['cache']['measured'][-1]['bytes_per_token']:.0f} | - | "
             f"{o['ppl']:.3f} |"]
    for d, r in res["converted"].items():
        b = r["cache"]["measured"][-1]["bytes_per_token"]
        lines.append(f"| converted, d_kv {d} | {r['kv_lora_rank']} | {b:.0f} | "
                     f"{100 * (b / o['cache']['measured'][-1]['bytes_per_token'] - 1):+.2f}% | {r['ppl']:.3f} |")
    for name in ("healed", "control"):
        if name in res:
            r = res[name]
            lines.append(f"| {name} ({r['steps']} steps, {r['seconds']:.0f} s) | "
                         f"{'96' if name == 'healed' else '-'} | "
                         f"{r['cache']['measured'][-1]['bytes_per_token']:.0f} | | {r['prose_ppl']:.3f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
