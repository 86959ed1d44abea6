"""``tunelab plan``'s memory estimate (plan/memory.py) against memory measured on the tiny model.

The measurement does not use the estimator's formulas. One real optimizer step of
``builtin:tiny-llama`` (full fine-tune and LoRA, two sequence lengths, with and without gradient
checkpointing), then: the bytes of every parameter storage, of every ``.grad``, of every tensor in
``optimizer.state``; activations are the bytes of every tensor autograd saves for backward during
the forward pass (``saved_tensors_hooks``, deduplicated by storage, parameters excluded). With
checkpointing the backward pass recomputes one layer at a time: the largest per-layer saved bytes
of the same forward without checkpointing are added. A strategy's per-rank total here is the
measured single-process parts divided as it divides them, plus DeepSpeed's fp32 master copy under
ZeRO-1..3; what DeepSpeed itself holds on each of 2 ranks (weights, gradient and optimizer partitions,
master copy) is measured in tests/integration/test_plan_zero_shares.py.

``python tests/unit/plan/test_memory.py`` prints the table in docs/benchmarks.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tunelab.models.builtin import builtin_model, builtin_tokenizer
from tunelab.models.peft import apply_peft
from tunelab.plan import estimate, parse_memory
from tunelab.recipe.load import load_recipe

REPO = Path(__file__).resolve().parents[3]


BATCH = 2


GPUS = 2


TOLERANCE = 0.25


CASES = [("tiny-llama", peft, seq, ckpt, "fp32") for peft in ("full", "lora") for seq in (64, 256)
         for ckpt in (False, True)]
CASES += [("tiny-qwen2", "full", 128, False, "fp32"), ("tiny-mistral", "lora", 128, True, "fp32")]  # biases; head_dim
# fp32 weights under bf16 autocast (CPU autocast: the same casts as on a GPU), the torch AdamW path only
CASES += [("tiny-llama", "full", 128, False, "bf16"), ("tiny-llama", "lora", 128, True, "bf16")]


def recipe_for(model: str, peft: str, seq: int, ckpt: bool, precision: str = "fp32"):
    path = REPO / "recipes/quickstart" / ("sft-lora.yaml" if peft == "lora" else "sft.yaml")
    overrides = [f"model.path=builtin:{model}", f"data.max_length={seq}", f"train.batch_size={BATCH}",
                 "model.dtype=float32", f"train.precision={precision}",
                 f"model.gradient_checkpointing={str(ckpt).lower()}"]
    return load_recipe(path, overrides).recipe


def _bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def measure(recipe) -> dict[str, float]:
    """Bytes held after one real AdamW step of the recipe's model, and the bytes autograd saved in its forward."""
    torch.manual_seed(0)
    model = builtin_model(recipe.model.path.removeprefix("builtin:"), dtype=torch.float32)
    if recipe.peft is not None:
        model = apply_peft(model, recipe.peft, builtin_tokenizer())
    hf = model.get_base_model() if recipe.peft is not None else model
    hf.train()
    seq = recipe.data.max_length
    # a packed micro batch as the collator builds it: two examples per row, position ids restart
    ids = torch.randint(3, 1400, (BATCH, seq))
    pos = torch.cat([torch.arange(seq // 3), torch.arange(seq - seq // 3)]).repeat(BATCH, 1)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layers = list(hf.model.layers)

    def forward_saved(checkpointing: bool) -> tuple[torch.Tensor, int, int]:
        if checkpointing:
            hf.gradient_checkpointing_enable()
            hf.enable_input_require_grads()
        else:
            hf.gradient_checkpointing_disable()
        where, per_layer, seen = ["outside"], {}, set()
        hooks = [m.register_forward_pre_hook(lambda _m, _a, i=i: where.__setitem__(0, i)) for i, m in enumerate(layers)]
        hooks += [m.register_forward_hook(lambda *_: where.__setitem__(0, "outside")) for m in layers]

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = t.untyped_storage().data_ptr()
            if key not in param_ptrs and key not in seen:
                seen.add(key)
                per_layer[where[0]] = per_layer.get(where[0], 0) + _bytes(t)
            return t

        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.train.precision == "bf16")
        with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(input_ids=ids, position_ids=pos).logits
            # tunelab's SFT loss path (methods/sft.py): shifted logits in fp32, token-level cross-entropy
            per_token = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                                          ids[:, 1:].reshape(-1), reduction="none")
            loss = per_token.sum() / per_token.numel()
        for h in hooks:
            h.remove()
        largest_layer = max((v for k, v in per_layer.items() if k != "outside"), default=0)
        return loss, sum(per_layer.values()), largest_layer

    ckpt = recipe.model.gradient_checkpointing
    if ckpt:
        loss, _, one_layer = forward_saved(False)  # what one layer saves, recomputed during backward
        del loss
        loss, saved, _ = forward_saved(True)
        activations = saved + one_layer
    else:
        loss, activations, _ = forward_saved(False)
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    opt.step()
    storages = {p.untyped_storage().data_ptr(): _bytes(p) for p in model.parameters()}
    layer_params = max(sum(_bytes(p) for p in layer.parameters()) for layer in layers)
    return dict(
        weights=float(sum(storages.values())),
        trainable=float(sum(_bytes(p) for p in trainable)),
        grads=float(sum(_bytes(p.grad) for p in trainable if p.grad is not None)),
        optimizer=float(sum(_bytes(v) for state in opt.state.values() for v in state.values()
                            if isinstance(v, torch.Tensor))),
        activations=float(activations),
        largest_layer=float(layer_params),
    )


def measured_share(m: dict[str, float], strategy: str, gpus: int) -> float:
    """What one rank holds under a strategy, from the single-process measurement: ZeRO-1 divides the
    optimizer states by the ranks, ZeRO-2 also the gradients, ZeRO-3 and FSDP2 also the parameters
    (plus one gathered layer); offload takes the optimizer (ZeRO-3: and the parameters) off the GPU.
    ZeRO-1..3 also step an fp32 copy of the trainable parameters (the fp32 runs here: their own bytes),
    measured on 2 ranks in tests/integration/test_plan_zero_shares.py."""
    base, _, offload = strategy.partition("+")
    stage = {"zero1": 1, "zero2": 2, "zero3": 3, "fsdp2": 3}.get(base, 0)
    weights, grads, opt = m["weights"], m["grads"], m["optimizer"]
    if base.startswith("zero") and stage >= 1:
        opt += m["trainable"]
    extra = 0.0
    if stage >= 1:
        opt /= gpus
    if stage >= 2:
        grads /= gpus
    if stage >= 3:
        weights /= gpus
        extra = m["largest_layer"]
    if offload:
        opt = 0.0
        if base == "fsdp2":
            grads = 0.0
        if stage >= 3:
            weights = 0.0
    return weights + grads + opt + m["activations"] + extra


STRATEGIES = ["none", "zero1", "zero2", "zero2+cpu", "zero3", "zero3+cpu", "fsdp2", "fsdp2+cpu"]


def compare(model: str, peft: str, seq: int, ckpt: bool, precision: str) -> list[dict]:
    recipe = recipe_for(model, peft, seq, ckpt, precision)
    m = measure(recipe)
    plan = estimate(recipe, gpus=GPUS, gpu_memory=parse_memory("80GB"), gpu=False)
    rows = []
    none = next(e for e in plan.estimates if e.strategy == "none")
    for part in ("weights", "grads", "optimizer", "activations"):
        rows.append(dict(case=(model, peft, seq, ckpt, precision), what=part, est=getattr(none, part), meas=m[part]))
    # DeepSpeed under bf16 holds 16-bit weights: not what a torch autocast step holds, so fp32 only
    for s in STRATEGIES if precision == "fp32" else STRATEGIES[:1]:
        e = next(e for e in plan.estimates if e.strategy == s)
        rows.append(dict(case=(model, peft, seq, ckpt, precision), what=f"total {s}", est=e.total,
                         meas=measured_share(m, s, 1 if s == "none" else GPUS)))
    return rows


@pytest.fixture(scope="module")
def comparisons():
    return {case: compare(*case) for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=[f"{m}-{p}-{s}-{'ckpt' if c else 'nockpt'}-{x}" for m, p, s, c, x in CASES])
def test_estimate_within_25_percent_of_measured(comparisons, case):
    bad = [f"{r['what']}: estimate {r['est']:.0f} B, measured {r['meas']:.0f} B ({r['est'] / r['meas']:.3f})"
           for r in comparisons[case] if r["meas"] > 0 and abs(r["est"] / r["meas"] - 1) > TOLERANCE]
    assert not bad, "\n".join(bad)


def test_lora_trainable_count_is_exact():
    """The adapter count from shapes equals what PEFT builds (r(in + out) per targeted linear)."""
    from tunelab.models.builtin import builtin_config
    from tunelab.plan import adapter_params, model_shape

    for target in ("all-linear", ["q_proj", "v_proj"]):
        recipe = load_recipe(REPO / "recipes/quickstart/sft-lora.yaml", ["peft.r=8"]).recipe
        recipe.peft.target_modules = target
        model = apply_peft(builtin_model("tiny-llama"), recipe.peft, builtin_tokenizer())
        real = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert adapter_params(model_shape(builtin_config("tiny-llama")), recipe.peft) == real


def test_zero_stages_divide_and_cheapest_fit():
    """ZeRO-1/2/3 shrink the per-GPU total in order; a budget between two stages picks the cheaper one."""
    recipe = load_recipe(REPO / "recipes/quickstart/sft.yaml", ["model.dtype=float32", "train.precision=fp32"]).recipe
    plan = estimate(recipe, gpus=4, gpu_memory=parse_memory("80GB"), gpu=False)
    t = {e.strategy: e for e in plan.estimates}
    # DeepSpeed's fp32 master copy (the size of the fp32 weights) joins torch's two states, then all is divided
    assert t["zero1"].optimizer == pytest.approx((t["ddp"].optimizer + t["ddp"].weights) / 4)
    assert t["zero2"].grads == pytest.approx(t["ddp"].grads / 4)
    assert t["zero3"].weights == pytest.approx(t["ddp"].weights / 4)
    assert t["zero3+cpu"].optimizer == 0 and t["zero3+cpu"].weights == 0
    assert t["ddp"].total > t["zero1"].total > t["zero2"].total > t["zero3+cpu"].total
    assert plan.fits == "ddp"
    budget = (t["zero1"].total + t["zero2"].total) / 2 / 0.9
    plan = estimate(recipe, gpus=4, gpu_memory=budget, gpu=False)
    assert plan.fits == "zero2"
    plan = estimate(recipe, gpus=4, gpu_memory=1e3, gpu=False)
    assert plan.fits is None and plan.suggestions


def test_qlora_and_methods_count_their_models():
    """QLoRA's base is about 4.5 bits per quantized weight; DPO adds a frozen reference only without PEFT;
    PPO adds a trained critic."""
    lora = load_recipe(REPO / "recipes/quickstart/sft-lora.yaml", ["model.dtype=float32"]).recipe
    qlora = load_recipe(REPO / "recipes/quickstart/sft-qlora.yaml", ["model.dtype=float32"]).recipe
    w = {name: next(e for e in estimate(r).estimates if e.strategy == "none").weights
         for name, r in (("lora", lora), ("qlora", qlora))}
    assert w["qlora"] < w["lora"]
    dpo = load_recipe(REPO / "recipes/quickstart/dpo.yaml", ["model.path=builtin:tiny-llama"]).recipe
    names = [c.name for c in estimate(dpo).components]
    assert names == ["policy", "reference"]
    dpo_lora = load_recipe(REPO / "recipes/quickstart/dpo.yaml", ["model.path=builtin:tiny-llama",
                                                                   "peft={method: lora}"]).recipe
    assert [c.name for c in estimate(dpo_lora).components] == ["policy"]
    ppo = load_recipe(REPO / "recipes/quickstart/ppo.yaml", ["model.path=builtin:tiny-llama"]).recipe
    comps = {c.name: c for c in estimate(ppo).components}
    assert set(comps) == {"policy", "reference", "critic"} and comps["critic"].optimizer > 0


def measure_qlora_weights() -> tuple[float, float]:
    """(estimated, measured) bytes of the QLoRA quickstart base: quantized storages + their quant states."""
    from tunelab.models.load import load_model
    from tunelab.models.peft import quantization_of

    recipe = load_recipe(REPO / "recipes/quickstart/sft-qlora.yaml", ["model.dtype=float32"]).recipe
    model = load_model(recipe.model, quantization_of(recipe), full_finetune=False)
    total, seen = 0, set()
    for p in model.parameters():
        if p.untyped_storage().data_ptr() in seen:
            continue
        seen.add(p.untyped_storage().data_ptr())
        total += _bytes(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            total += _bytes(qs.absmax)
            if qs.nested:
                total += _bytes(qs.state2.absmax) + _bytes(qs.offset)
    est = next(e for e in estimate(recipe, gpu=False).estimates if e.strategy == "none").weights
    from tunelab.models.builtin import builtin_config
    from tunelab.plan import adapter_params, model_shape

    est -= 4 * adapter_params(model_shape(builtin_config("tiny-llama")), recipe.peft)  # the base only
    return est, float(total)


if __name__ == "__main__":  # the tables in docs/benchmarks.md
    MiB = 2**20
    results = {case: compare(*case) for case in CASES}
    print("| model | tuning | precision | seq | ckpt | weights | grads | optimizer | activations | total (none) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (m, p, s, c, x), rows in results.items():
        cells = [f"{r['est'] / MiB:.3f} / {r['meas'] / MiB:.3f} ({r['est'] / r['meas']:.3f})" for r in rows[:5]]
        print(f"| {m} | {p} | {x} | {s} | {'on' if c else 'off'} | " + " | ".join(cells) + " |")
    print()
    print("| model | tuning | seq | ckpt | " + " | ".join(STRATEGIES) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in STRATEGIES) + " |")
    for (m, p, s, c, x), rows in results.items():
        if x != "fp32":
            continue
        cells = [f"{r['est'] / MiB:.2f} / {r['meas'] / MiB:.2f} ({r['est'] / r['meas']:.3f})" for r in rows[4:]]
        print(f"| {m} | {p} | {s} | {'on' if c else 'off'} | " + " | ".join(cells) + " |")
    est, meas = measure_qlora_weights()
    print(f"\nqlora base weights: estimate {est:.0f} B, measured {meas:.0f} B, ratio {est / meas:.3f}")
