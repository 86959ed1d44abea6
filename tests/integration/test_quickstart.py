"""The README's quickstart: the loss falls and held-out perplexity beats the untrained model and a unigram model."""

import collections
import json
import math
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[2] / "recipes/quickstart/sft.yaml"


def unigram_perplexity() -> tuple[float, int]:
    """(perplexity, scored tokens) of an add-one unigram model of the quickstart's trained tokens on its eval rows.

    The rows are tokenized as the run tokenizes them (build_datasets, the run's tokenizer), and the tokens
    scored are the ones the run's held-out perplexity scores: every label but each row's first. The
    counts come from the train rows' labels, so the model knows which tokens answers use: the best a
    model can do without looking at context (~124 on this data). A trained model that only learnt the
    token frequencies would pass ``after < before / 5`` (the untrained model is ~vocab size, 1435).
    """
    from tunelab.data.pipeline import build_datasets
    from tunelab.models.load import load_tokenizer
    from tunelab.recipe.load import load_recipe

    recipe = load_recipe(RECIPE).recipe
    tok = load_tokenizer(recipe.model)
    train, held_out, _ = build_datasets(recipe, tok)

    def scored(rows):
        return [t for labels in rows["labels"] for t in labels[1:] if t != -100]

    counts = collections.Counter(scored(train))
    n, vocab = sum(counts.values()), len(tok)
    targets = scored(held_out)
    nll = -sum(math.log((counts[t] + 1) / (n + vocab)) for t in targets) / len(targets)
    return math.exp(nll), len(targets)


@pytest.mark.slow
def test_quickstart_sft_learns(run_cli, quickstart_sft):
    out, rc, stdout, stderr = quickstart_sft
    assert rc == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    loss = summary["train_loss"]
    assert loss["last"] < 0.7 * loss["first"], loss
    before, after = summary["eval_before"]["perplexity"], summary["eval_after"]["perplexity"]
    assert after < before / 5, (before, after)
    # far better than token frequencies alone: the model uses the context (measured: 2.52 vs a unigram 123.9)
    unigram, scored = unigram_perplexity()
    assert scored == summary["eval_after"]["tokens"]  # the same tokens, tokenized the same way
    assert after < unigram / 10, (after, unigram)
    # both numbers are printed for the user
    assert "train loss: first 10% of logged steps" in stdout and "eval perplexity:" in stdout
    # the run directory DESIGN.md describes
    for name in ("recipe.lock.yaml", "metrics.jsonl", "data_report.json", "plots/loss.png", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json", "final/generation_config.json"):
        assert (out / name).exists(), name
    assert any(p.name.startswith("checkpoint-") for p in out.iterdir())
    page = (out / "report.html").read_text(encoding="utf-8")  # written at the end of every run
    assert page.count("src='data:image/png;base64,") >= 5 and "train length histogram" in page
    assert sum(json.loads((out / "data_report.json").read_text())["train"][0]["length_histogram"]) == 1200
    assert any((out / "tensorboard").rglob("events.out.tfevents*"))
    assert not (out / ".staging").exists()
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"][0]["used"] > 0  # exact counts: tests/integration/test_data_report.py

    # the trained model answers through the chat template, and plain transformers loads it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert "{% generation %}" in tok.chat_template
    assert len(tok) <= model.config.vocab_size
    rc, stdout, stderr = run_cli("generate", str(out), "What is 2 plus 3?")
    assert rc == 0, stderr[-2000:]
    # the run's own held-out perplexity (packed rows, the trainer's attention) equals a fresh process's
    # `tunelab eval` of the saved model (plain SDPA)
    rc, stdout, stderr = run_cli("eval", str(out), "--data", "builtin:quickstart/sft_eval")
    assert rc == 0, stderr[-2000:]
    printed = float(stdout.split("perplexity:")[-1].split()[0])
    assert printed == pytest.approx(after, abs=2e-4), (printed, after)
    rc, stdout, stderr = run_cli("eval", str(out), "--data", "builtin:quickstart/sft_eval", "--generate",
                                 "--limit", "8", "--max-new-tokens", "24")
    assert rc == 0, stderr[-2000:]
    assert "perplexity:" in stdout and "BLEU:" in stdout and "ROUGE-L:" in stdout
