"""KV-cache size: predicted from the config, and measured on the cache object after greedy generation.

A stock model caches a key and a value vector per KV head per layer per token: 2 x layers x
num_kv_heads x head_dim numbers. An MLA-converted model caches the latent and the RoPE key
instead: layers x (kv_lora_rank + rope values) numbers, where rope values are num_kv_heads x
rope_dim with a per-head RoPE key and rope_dim with a shared one. Both are multiplied by the
bytes of the cache's dtype (the model's).

The measurement generates greedily from a prompt, passing a cache object in
(``MLACache`` for an MLA model, transformers' ``DynamicCache`` otherwise), and reads the bytes
its tensors hold. Generation stops after a fixed number of new tokens (EOS is suppressed), so
the cache holds exactly the requested length: the prompt plus every generated token but the last,
which is never fed back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

NEW_TOKENS = 8


def predicted_kv_bytes(config: Any, dtype_bytes: int) -> dict[str, Any]:
    """The cache bytes per token before (original geometry) and after (MLA, when converted), and the reduction."""
    from tunelab.patches.mla.convert import kv_cache_bytes_per_token

    before = kv_cache_bytes_per_token(config, dtype_bytes, original=True)
    mla = getattr(config, "mla", None)
    out: dict[str, Any] = {"original_bytes_per_token": before, "mla": None, "bytes_per_token": before,
                           "reduction": 0.0}
    if mla:
        after = kv_cache_bytes_per_token(config, dtype_bytes)
        out.update(mla={k: mla.get(k) for k in ("kv_lora_rank", "rope_dim", "rope_key", "partial_rope", "svd",
                                                "latent_norm")},
                   bytes_per_token=after, reduction=1 - after / before)
    return out


def cache_nbytes(cache: Any) -> int:
    """Bytes held by every tensor of a transformers cache object (all layers, all sequences)."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


def _prompt_ids(config: Any, length: int, seed: int) -> Any:
    """``length`` token ids drawn from the vocabulary (skipping the low ids specials usually take)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = config.vocab_size
    low = min(3, vocab - 1)
    return torch.randint(low, vocab, (1, length), generator=g)


def measure_kv_cache(model: Any, length: int, seed: int = 0) -> dict[str, Any]:
    """Generate greedily until the cache holds ``length`` tokens; its class, tokens and bytes."""
    import torch
    from transformers import DynamicCache

    config = model.config
    new = max(1, min(NEW_TOKENS, length // 2))
    prompt = _prompt_ids(config, length - new + 1, seed).to(next(model.parameters()).device)
    if getattr(config, "mla", None):
        from tunelab.patches.mla.attention import MLACache

        cache: Any = MLACache()
    else:
        cache = DynamicCache(config=config)
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                       use_cache=True, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                       pad_token_id=getattr(model.generation_config, "pad_token_id", None) or 0)
    tokens = int(cache.get_seq_length())
    nbytes = cache_nbytes(cache)
    return {"length": length, "prompt_tokens": int(prompt.shape[1]), "new_tokens": new, "cache": type(cache).__name__,
            "tokens": tokens, "bytes": nbytes, "bytes_per_token": nbytes / tokens if tokens else 0.0}


def kv_cache_report(model: Any, lengths: Sequence[int]) -> dict[str, Any]:
    """Predicted bytes per token, and the measured cache at each length with whether it matches."""
    dtype = next(model.parameters()).dtype
    dtype_bytes = next(model.parameters()).element_size()
    config = model.config
    report = {"dtype": str(dtype).removeprefix("torch."), "dtype_bytes": dtype_bytes,
              "layers": config.num_hidden_layers, **predicted_kv_bytes(config, dtype_bytes)}
    rows = []
    for length in lengths:
        m = measure_kv_cache(model, length)
        m["predicted_bytes"] = report["bytes_per_token"] * m["tokens"]
        m["matches"] = m["bytes"] == m["predicted_bytes"]
        rows.append(m)
    report["measured"] = rows
    report["all_match"] = all(r["matches"] for r in rows)
    return report


def format_kv_report(report: dict[str, Any]) -> str:
    """The prediction and the measurements as text."""
    b, layers = report["dtype_bytes"], report["layers"]
    before = report["original_bytes_per_token"]
    lines = [f"KV cache per token ({report['dtype']}, {b} bytes per number, {layers} layers):",
             f"  original K/V: {before:>10,} bytes"]
    mla = report["mla"]
    if mla:
        lines.append(f"  MLA latent:   {report['bytes_per_token']:>10,} bytes  (kv_lora_rank {mla['kv_lora_rank']}, "
                     f"rope_dim {mla['rope_dim']} {mla['rope_key']}): {100 * report['reduction']:.1f}% smaller")
    else:
        lines.append("  (not an MLA model: the cache holds the full keys and values)")
    lines.append(f"{'length':>8} {'cache':>13} {'tokens':>7} {'bytes':>12} {'bytes/token':>12} {'predicted':>12} "
                 f"{'match':>6}")
    for r in report["measured"]:
        lines.append(f"{r['length']:>8} {r['cache']:>13} {r['tokens']:>7} {r['bytes']:>12,} "
                     f"{r['bytes_per_token']:>12,.1f} {r['predicted_bytes']:>12,} {'yes' if r['matches'] else 'NO':>6}")
    return "\n".join(lines)
