"""The MLA quickstart experiment: perplexity before conversion, right after it, and after healing.

    tunelab train recipes/long-context/pretrain.yaml     # the base model (about 3.5 min on CPU)
    python scripts/mla_experiment.py                     # about 5 min on a 2-core CPU

On the held-out documents ``builtin:long-context/long_eval`` (windows of 128 tokens, the length
the base model was trained at) it measures, for each healing recipe in ``recipes/mla``:
- the base model;
- the model right after the recipe's MLA conversion (the patch applied as ``tunelab train``
  applies it, no training);
- the healed model (``tunelab train RECIPE``);
- a control: the base model fine-tuned by the same recipe without the patch (same data, epochs
  and learning rate), so that healing is compared with what the extra training alone gives;
- the KV-cache bytes per token (``tunelab eval --task kv-cache``, measured on the cache object).
It also converts the base model at several ranks (no training) for the rank/perplexity curve.
Writes ``results.json`` and ``table.md`` into ``--out``.
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
RECIPES = ["recipes/mla/heal.yaml", "recipes/mla/heal-deepseek.yaml"]


def tunelab(*args: str) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([sys.executable, "-m", "tunelab", *args], check=True, cwd=REPO, env=env)


def ppl(model, ids: list[int], length: int) -> float:  # noqa: ANN001
    from tunelab.eval.long_context import ppl_vs_length

    return ppl_vs_length(model.eval(), ids, [length])[0]["ppl"]


def converted_by_recipe(recipe_path: str, overrides: list[str]):  # noqa: ANN201
    """The recipe's base model with its patches applied exactly as ``tunelab train`` does, before training."""
    from tunelab.models.load import load_model, load_tokenizer
    from tunelab.patches import apply_patches
    from tunelab.recipe.load import load_recipe

    recipe = load_recipe(REPO / recipe_path, overrides).recipe
    model = load_model(recipe.model)
    tokenizer = load_tokenizer(recipe.model)
    records = apply_patches(model, recipe, tokenizer)
    return model, records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="runs/long-context-pretrain/final")
    ap.add_argument("--out", default="runs/mla-experiment")
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=20000)
    ap.add_argument("--ranks", default="8,16,32,64,128")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    args = ap.parse_args()

    import torch

    from tunelab.eval.kv_cache import kv_cache_report
    from tunelab.eval.long_context import text_token_ids
    from tunelab.models.inference import load_for_inference

    torch.manual_seed(0)
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    base, tok = load_for_inference(args.base)
    ids = text_token_ids("builtin:long-context/long_eval", tok, "text", max_tokens=args.max_tokens)
    results: dict = {"base": args.base, "length": args.length, "tokens": len(ids), "base_ppl": ppl(base, ids, args.length),
                     "base_cache": kv_cache_report(base, [64, 128]), "recipes": {}, "ranks": []}
    print(f"base: ppl {results['base_ppl']:.3f}", flush=True)

    for recipe in args.recipes.split(","):
        name = Path(recipe).stem
        row: dict = {}
        model, records = converted_by_recipe(recipe, [f"model.path={args.base}"])
        row["patch"] = records[0]
        row["converted_ppl"] = ppl(model, ids, args.length)
        healed, control = f"{args.out}/{name}", f"{args.out}/{name}-control"
        t0 = time.time()
        tunelab("train", recipe, "--set", f"model.path={args.base}", "--set", f"train.output_dir={healed}")
        row["heal_seconds"] = round(time.time() - t0, 1)
        tunelab("train", recipe, "--set", f"model.path={args.base}", "--set", "patches=[]",
                "--set", f"train.output_dir={control}")
        healed_model, _ = load_for_inference(f"{healed}/final")
        control_model, _ = load_for_inference(f"{control}/final")
        row["healed_ppl"] = ppl(healed_model, ids, args.length)
        row["control_ppl"] = ppl(control_model, ids, args.length)
        row["cache"] = kv_cache_report(healed_model, [64, 128])
        gap = row["converted_ppl"] - row["control_ppl"]
        row["recovered"] = (row["converted_ppl"] - row["healed_ppl"]) / gap if gap > 0 else None
        results["recipes"][name] = row
        print(f"{name}: converted {row['converted_ppl']:.3f} -> healed {row['healed_ppl']:.3f} "
              f"(control {row['control_ppl']:.3f}, base {results['base_ppl']:.3f})", flush=True)

    for rank in [int(r) for r in args.ranks.split(",")]:
        for rope_key in ("per-head", "shared"):
            model, records = converted_by_recipe(RECIPES[0], [f"model.path={args.base}",
                                                              f"patches.0.kv_lora_rank={rank}",
                                                              f"patches.0.rope_key={rope_key}"])
            results["ranks"].append({"kv_lora_rank": rank, "rope_key": rope_key, "ppl": ppl(model, ids, args.length),
                                     "bytes_per_token": records[0].get("kv_cache_bytes_per_token_after")})
            print(f"rank {rank} {rope_key}: ppl {results['ranks'][-1]['ppl']:.3f}", flush=True)

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"Perplexity at {args.length} tokens on builtin:long-context/long_eval ({len(ids)} tokens); "
             f"base model {results['base_ppl']:.3f}.", "",
             "| recipe | KV cache bytes/token (fp32) | converted | healed | control (no conversion) | gap recovered |",
             "|---|---|---|---|---|---|"]
    for name, row in results["recipes"].items():
        rec = "n/a" if row["recovered"] is None else f"{100 * row['recovered']:.0f}%"
        lines.append(f"| {name} | {results['base_cache']['bytes_per_token']} -> {row['cache']['bytes_per_token']} | "
                     f"{row['converted_ppl']:.3f} | {row['healed_ppl']:.3f} | {row['control_ppl']:.3f} | {rec} |")
    lines += ["", "| kv_lora_rank | RoPE key | bytes/token (fp32) | perplexity right after conversion |", "|---|---|---|---|"]
    for r in results["ranks"]:
        lines.append(f"| {r['kv_lora_rank']} | {r['rope_key']} | {r['bytes_per_token']} | {r['ppl']:.3f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
