"""Held-out perplexity on a real model is no slower per token than the training forward pass, and shows progress.

Measured in one process on SmolLM2-135M + LoRA, after the SFT trainer is built (TRL wraps the LM head
then): the eval's tokens per second (as `train` runs it) against a forward pass with gradients of the
trainer's own packed batches (real tokens), both warmed up. Figures: docs/real-models.md.
"""

from __future__ import annotations

import time

import pytest
from tunelab.methods.base import RunHooks

pytestmark = [pytest.mark.real, pytest.mark.slow]


def test_eval_is_at_least_as_fast_as_the_training_forward_pass_and_shows_progress(smollm2_gguf, capsys):
    from tunelab.data.pipeline import build_datasets
    from tunelab.eval.perplexity import perplexity
    from tunelab.methods import METHODS

    build_trainer, sft_evaluate = METHODS["sft"].build_trainer, METHODS["sft"].evaluate
    from tunelab.models.load import load_model, load_tokenizer
    from tunelab.models.peft import apply_peft
    from tunelab.recipe.load import load_recipe

    recipe = load_recipe("recipes/real/sft-lora.yaml", ["data.eval.0.samples=40", "train.report_to=[none]"]).recipe
    tok = load_tokenizer(recipe.model)
    train_ds, eval_ds, _ = build_datasets(recipe, tok)
    model = apply_peft(load_model(recipe.model, None, full_finetune=False), recipe.peft, tok, False)
    trainer = build_trainer(recipe, model, tok, train_ds, eval_ds, RunHooks())
    model.train()
    batches = [b for _, b in zip(range(5), trainer.get_train_dataloader())]

    def train_forward_rate() -> float:
        tokens, spent = 0, 0.0
        for batch in batches[1:]:  # the first one warms up
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_real_tokens")}
            start = time.perf_counter()
            model(**inputs)
            spent += time.perf_counter() - start
            tokens += int(batch.get("num_real_tokens", inputs["input_ids"].numel()))
        return tokens / spent

    def eval_rate_and_result() -> tuple[float, dict]:
        start = time.perf_counter()
        result = sft_evaluate(model, eval_ds, recipe, tok)  # what `train` runs before and after training
        return sum(len(x) for x in eval_ds["input_ids"]) / (time.perf_counter() - start), result

    model(**{k: v for k, v in batches[0].items() if k not in ("labels", "num_real_tokens")})
    capsys.readouterr()
    rates = []
    for _ in range(2):  # interleaved, the better of two each: one slow moment on a shared CPU decides nothing
        model.train()
        train_rate = train_forward_rate()
        eval_rate, result = eval_rate_and_result()
        rates.append((train_rate, eval_rate))
    train_rate, eval_rate = max(r[0] for r in rates), max(r[1] for r in rates)
    with capsys.disabled():
        print(f"\ntokens/s (training forward, eval): {[(round(a), round(b)) for a, b in rates]}")
    assert "eval perplexity" in capsys.readouterr().err  # the progress bar
    assert 1 < result["perplexity"] < 20
    assert result["perplexity"] == pytest.approx(perplexity(model, eval_ds, 1, tok.pad_token_id,
                                                            progress=False)["perplexity"], rel=1e-4)
    assert eval_rate >= train_rate, f"eval {eval_rate:.0f} tokens/s < training forward {train_rate:.0f} tokens/s"
