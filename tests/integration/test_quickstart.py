"""The README's quickstart: the loss falls and held-out perplexity beats the untrained model and a unigram model."""

import ast
import collections
import json
import math
import re
from pathlib import Path

import pytest
from plot_pixels import fit, png_images

RECIPE = Path(__file__).resolve().parents[2] / "recipes/quickstart/sft.yaml"
EVAL_ROWS = Path(__file__).resolve().parents[2] / "src/tunelab/data/builtin/quickstart/sft_eval.jsonl"


def greedy(model, tok, messages: list[dict], max_new_tokens: int) -> str:
    """Plain transformers: the model's greedy reply to a conversation through its saved chat template."""
    import torch

    x = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = model.generate(**x, max_new_tokens=max_new_tokens, do_sample=False)[0, x["input_ids"].shape[1]:]
    return tok.decode(ids, skip_special_tokens=True).strip()


def rouge_l_f1(hyp: str, ref: str) -> float:
    """ROUGE-L F1 over lower-cased alphanumeric words (rouge_score's tokenizer without stemming), by hand."""
    a, b = (re.findall(r"[a-z0-9]+", t.lower()) for t in (hyp, ref))
    lcs = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if x == y else max(lcs[i][j + 1], lcs[i + 1][j])
    n = lcs[-1][-1]
    return 0.0 if n == 0 else 2 * n / (len(a) + len(b))


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
    # and its loss plot draws this run's logged losses, read back from the pixels (tests/plot_pixels.py; measured R^2
    # 0.99997 over 45 points; against the same losses reversed -0.22, the learning rate 0.26, the grad norm 0.71)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(m["step"], m["loss"]) for m in metrics if "loss" in m and "step" in m]
    assert (r2 := fit(png_images(page)["loss"], losses)) > 0.99, r2
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
    # what `generate` printed is the trained model's own greedy reply: transformers' generate on final/, no tunelab
    # (measured: "9 plus 7 is 18.": a 2-layer model trained for a minute)
    reply = greedy(model, tok, [{"role": "user", "content": "What is 2 plus 3?"}], 128)
    assert stdout == reply + "\n", (stdout, reply)
    # the run's own held-out perplexity (packed rows, the trainer's attention) equals a fresh process's
    # `tunelab eval` of the saved model (plain SDPA)
    rc, stdout, stderr = run_cli("eval", str(out), "--data", "builtin:quickstart/sft_eval")
    assert rc == 0, stderr[-2000:]
    printed = float(stdout.split("perplexity:")[-1].split()[0])
    assert printed == pytest.approx(after, abs=2e-4), (printed, after)
    rc, stdout, stderr = run_cli("eval", str(out), "--data", "builtin:quickstart/sft_eval", "--generate",
                                 "--limit", "8", "--max-new-tokens", "24", "--samples", "8")
    assert rc == 0, stderr[-2000:]
    # the 8 generations it printed are final/'s greedy replies to the first 8 eval conversations (everything before
    # the last assistant turn), each beside that turn as its reference ...
    printed = re.findall(r"--- prompt: (.*)\n    reference: (.*)\n    generated: (.*)\n", stdout)
    rows = [json.loads(line) for line in EVAL_ROWS.read_text().splitlines()[:8]]
    assert len(printed) == len(rows) == 8, stdout
    hyps, refs = [], []
    for (prompt, ref, generated), row in zip(printed, rows):
        msgs = row["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        assert ast.literal_eval(prompt) == msgs[last - 1]["content"] and ast.literal_eval(ref) == msgs[last]["content"]
        assert ast.literal_eval(generated) == greedy(model, tok, msgs[:last], 24), (prompt, generated)
        hyps.append(ast.literal_eval(generated))
        refs.append(msgs[last]["content"])
    # ... and its BLEU and ROUGE-L are those of these replies against these references, computed here (sacrebleu's
    # corpus BLEU; ROUGE-L F1 from a longest common subsequence written out)
    scores = re.search(r"BLEU: ([0-9.]+)  ROUGE-L: ([0-9.]+)  \(8 generations\)", stdout)
    assert scores, stdout
    import sacrebleu

    assert float(scores[1]) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=0.005)
    assert float(scores[2]) == pytest.approx(100 * sum(map(rouge_l_f1, hyps, refs)) / 8, abs=0.005)
    # neither nothing nor a copy of the references (measured: BLEU 10.90, ROUGE-L 46.30; 1 of 8 replies exact)
    assert float(scores[1]) > 1 and 10 < float(scores[2]) < 100, scores[0]
