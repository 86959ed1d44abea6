"""BLEU and ROUGE-L (eval/generate.py) against hand-computed values, and `tunelab eval --generate`'s scores
(eval/commands.py run_eval) on generations fixed by the test: the reference is the last assistant turn.

The expected numbers are written out from the definitions (no call to the code under test):
ROUGE-L F1 from the longest common subsequence (P = LCS / hypothesis words, R = LCS / reference words),
BLEU from clipped n-gram precisions (n = 1..4, geometric mean, corpus-level sums) and the brevity penalty
exp(1 - r / c) when the hypotheses (c words) are shorter than the references (r words). The strings are
lower-case words without punctuation, so sacrebleu's 13a tokenizer and rouge-score's both split them on spaces.
"""

from __future__ import annotations

import json
import math

import pytest
import sacrebleu

from tunelab.eval.generate import bleu, rouge_l

REF = "the cat sat on the mat"


def f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r)


# (hypothesis, reference, F1 of ROUGE-L by hand)
ROUGE_CASES = [
    ("the cat on mat", REF, f1(4 / 4, 4 / 6)),  # LCS "the cat on mat" = 4: P 4/4, R 4/6, F 0.8
    ("d c b a", "a b c d", f1(1 / 4, 1 / 4)),  # reversed: LCS 1, F 0.25
    ("one two three four five", "one two three", f1(3 / 5, 3 / 3)),  # LCS 3: P 3/5, R 1, F 0.75
    ("mat the on sat cat the", REF, f1(3 / 6, 3 / 6)),  # shuffled: LCS 3 ("the on the", "the sat the", ...), F 0.5
]


@pytest.mark.parametrize(("hyp", "ref", "f"), ROUGE_CASES, ids=["dropped-words", "reversed", "extra-words", "shuffled"])
def test_rouge_l_is_the_lcs_f_measure(hyp, ref, f):
    assert rouge_l([hyp], [ref]) == pytest.approx(100 * f, abs=1e-9)


def test_rouge_l_is_the_mean_over_pairs():
    hyps, refs, fs = zip(*ROUGE_CASES)
    assert [round(100 * x, 6) for x in fs] == [80.0, 25.0, 75.0, 50.0]
    assert rouge_l(list(hyps), list(refs)) == pytest.approx(100 * sum(fs) / len(fs), abs=1e-9)
    assert rouge_l([], []) == 0.0


# hypothesis 1: one word wrong ("a" for "the"), same length as REF
#   1-grams 5/6, 2-grams 3/5 (the cat, cat sat, sat on), 3-grams 2/4, 4-grams 1/3 (the cat sat on); BP 1
H1, BLEU_H1 = "the cat sat on a mat", 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25  # 53.73
# hypothesis 2: REF without its last word: every n-gram matches, 5 words for 6: BP exp(1 - 6/5)
H2, BLEU_H2 = "the cat sat on the", 100 * math.exp(1 - 6 / 5)  # 81.87
# the other way round (REF scored against H2 as the reference) is 6 words for 5: no brevity penalty,
# precisions 5/6, 4/5, 3/4, 2/3
BLEU_H2_SWAPPED = 100 * (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25  # 75.98
# the corpus of both: matches and counts summed before the mean (not a mean of sentence scores):
#   1-grams (5+5)/(6+5), 2-grams (3+4)/(5+4), 3-grams (2+3)/(4+3), 4-grams (1+2)/(3+2); c = 11, r = 12
BLEU_CORPUS = 100 * math.exp(1 - 12 / 11) * (10 / 11 * 7 / 9 * 5 / 7 * 3 / 5) ** 0.25  # 67.75


@pytest.mark.parametrize(("hyp", "want"), [(H1, BLEU_H1), (H2, BLEU_H2), (REF, 100.0)],
                         ids=["one-word-wrong", "short", "exact"])
def test_sentence_bleu_by_hand(hyp, want):
    assert bleu([hyp], [REF]) == pytest.approx(want, abs=1e-9)


def test_bleu_scores_hypotheses_against_references_not_the_reverse():
    assert BLEU_H2_SWAPPED == pytest.approx(75.98, abs=0.01) and BLEU_H2 == pytest.approx(81.87, abs=0.01)
    assert bleu([H2], [REF]) == pytest.approx(BLEU_H2, abs=1e-9)
    assert bleu([REF], [H2]) == pytest.approx(BLEU_H2_SWAPPED, abs=1e-9)


def test_corpus_bleu_sums_counts_over_sentences():
    got = bleu([H1, H2], [REF, REF])
    assert got == pytest.approx(BLEU_CORPUS, abs=1e-9)
    assert abs(got - (BLEU_H1 + BLEU_H2) / 2) > 0.04  # not the mean of the sentence scores (67.80)


def test_bleu_equals_sacrebleu_on_real_text():
    """Mixed case and punctuation, computed by sacrebleu's object API independently of eval/generate.py."""
    hyps = ["The answer is 5.", "Paris is the capital of France!", "I don't know, sorry.", "2 plus 3 is 5"]
    refs = ["The answer is 5.", "The capital of France is Paris.", "I do not know.", "2 plus 3 equals 5."]
    want = sacrebleu.metrics.BLEU().corpus_score(hyps, [refs]).score
    assert 10 < want < 90
    assert bleu(hyps, refs) == pytest.approx(want, abs=1e-9)


def test_eval_generate_scores_the_generations_against_the_last_assistant_turn(tmp_path, monkeypatch, capsys):
    """`tunelab eval --generate` (run_eval): the hypotheses are the model's replies to everything before the last
    assistant turn, the references that turn; a bad row is skipped; the printed numbers are the returned ones."""
    import tunelab.eval.commands as commands

    rows = [
        {"messages": [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": REF}]},
        {"messages": [{"role": "user", "content": "no answer here"}]},  # bad row: skipped
        {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "hello there"},
                      {"role": "user", "content": "Again."}, {"role": "assistant", "content": REF}]},
    ]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    replies = {"Say something.": H1, "Again.": H2}

    def fixed(model, tokenizer, messages, **gen):
        seen.append([m["content"] for m in messages])
        return replies[messages[-1]["content"]]

    monkeypatch.setattr(commands, "generate", fixed)
    result = commands.run_eval("builtin:tiny-llama", str(data), "messages", 128, 2, None, {"max_new_tokens": 4}, 0)
    assert seen == [["Say something."], ["Hi.", "hello there", "Again."]]
    assert result["bleu"] == pytest.approx(BLEU_CORPUS, abs=1e-9)
    # ROUGE-L by hand: H1 vs REF LCS 5 of 6 and 6 (P = R = 5/6); H2 vs REF LCS 5 (P 5/5, R 5/6)
    assert result["rougeL"] == pytest.approx(100 * (f1(5 / 6, 5 / 6) + f1(1, 5 / 6)) / 2, abs=1e-9)
    out = capsys.readouterr().out
    assert f"BLEU: {BLEU_CORPUS:.2f}  ROUGE-L: {result['rougeL']:.2f}  (2 generations)" in out
    assert "BLEU: 67.75  ROUGE-L: 87.12" in out
