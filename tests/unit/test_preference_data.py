"""Preference data: the accepted shapes, tokenization, overflow and bad pairs (errors naming the row)."""

import json
from pathlib import Path

import pytest

from tunelab.data.formats import BadRow, to_preference
from tunelab.data.pipeline import encode_source
from tunelab.data.tokenize import encode_pair
from tunelab.errors import DataError
from tunelab.models.builtin import builtin_tokenizer
from tunelab.specs import DataSource, DataSpec

U = {"role": "user", "content": "What is 2 plus 2?"}
GOOD_A = {"role": "assistant", "content": "2 plus 2 is 4."}
BAD_A = {"role": "assistant", "content": "I don't know."}


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def src(**kw) -> DataSource:
    return DataSource(**{"source": "x.jsonl", "format": "preference", **kw})


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_string_and_conversation_pairs():
    assert to_preference({"prompt": "Q:", "chosen": " yes", "rejected": " no"}, src()) == {
        "prompt": "Q:", "chosen": " yes", "rejected": " no"}
    conv = to_preference({"prompt": [U], "chosen": [GOOD_A], "rejected": [BAD_A]}, src(system="Be brief."))
    assert conv["prompt"] == [{"role": "system", "content": "Be brief."}, U]
    assert conv["chosen"] == [GOOD_A] and conv["rejected"] == [BAD_A]
    # a string prompt with conversational answers is one user turn; string answers are assistant turns
    mixed = to_preference({"prompt": "hi", "chosen": "hello", "rejected": [BAD_A]}, src())
    assert mixed["prompt"] == [{"role": "user", "content": "hi"}]
    assert mixed["chosen"] == [{"role": "assistant", "content": "hello"}]


def test_shared_prefix_conversations_and_field_map():
    earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, U]
    row = {"good": earlier + [GOOD_A], "bad": earlier + [BAD_A], "score": 2}
    out = to_preference(row, src(field_map={"chosen": "good", "rejected": "bad", "margin": "score"}))
    assert out["prompt"] == earlier and out["chosen"] == [GOOD_A] and out["rejected"] == [BAD_A]
    assert out["margin"] == 2.0
    # a shared assistant turn stays in the prompt only up to the last user turn before the answers differ
    row = {"chosen": [U, GOOD_A, {"role": "user", "content": "thanks"}, GOOD_A],
           "rejected": [U, GOOD_A, {"role": "user", "content": "thanks"}, BAD_A]}
    assert len(to_preference(row, src())["prompt"]) == 3


@pytest.mark.parametrize("row, msg", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
    ({"prompt": [U], "chosen": [GOOD_A], "rejected": [GOOD_A]}, "chosen and rejected are identical"),
    ({"chosen": [U, GOOD_A], "rejected": [U, GOOD_A]}, "chosen and rejected are identical"),
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "q", "rejected": "a"}, "missing field 'chosen'"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "prompt is empty"),
    ({"prompt": [{"role": "user", "content": ""}], "chosen": "a", "rejected": "b"}, "prompt is empty"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen is empty"),
    ({"prompt": [U], "chosen": [GOOD_A], "rejected": []}, "rejected is empty"),
    ({"prompt": [U], "chosen": [U], "rejected": [GOOD_A]}, "chosen must start with an assistant message"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"chosen": [U, GOOD_A], "rejected": [{"role": "user", "content": "other"}, BAD_A]}, "share no opening turns"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "margin must be a number"),
    ({"messages": [U, GOOD_A]}, "missing field 'chosen'"),  # SFT data given to a preference method
])
def test_bad_pairs(row, msg):
    with pytest.raises(BadRow, match=msg):
        to_preference(row, src())


def test_encode_pair_is_the_rendered_conversation(tok):
    pair = {"prompt": [U], "chosen": [GOOD_A], "rejected": [BAD_A]}
    p, c, r = encode_pair(tok, pair)
    full_c = tok.apply_chat_template([U, GOOD_A], tokenize=True, return_dict=True)["input_ids"]
    full_r = tok.apply_chat_template([U, BAD_A], tokenize=True, return_dict=True)["input_ids"]
    # the rendered conversation through the end-of-turn token: the "\n" ChatML writes after it is not the response's
    newline = tok.encode("\n", add_special_tokens=False)
    assert p + c + newline == list(full_c) and p + r + newline == list(full_r)
    gen = tok.apply_chat_template([U], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert p == list(gen)  # the prompt ends with the assistant header
    assert tok.decode(c) == "2 plus 2 is 4.<|im_end|>" and c[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    p, c, r = encode_pair(tok, {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"})
    assert c[-1] == r[-1] == tok.eos_token_id and tok.decode(p) == "Q: 2+2?"


def _rows(n_long: int = 1):
    rows = [{"prompt": [U], "chosen": [GOOD_A], "rejected": [BAD_A]} for _ in range(3)]
    long_answer = {"role": "assistant", "content": "word " * 200}
    rows += [{"prompt": [U], "chosen": [long_answer], "rejected": [BAD_A]} for _ in range(n_long)]
    return rows


def test_overflow_counts_prompt_plus_longer_response(tmp_path, tok):
    f = write(tmp_path / "p.jsonl", _rows())
    s = src(source=str(f))
    rows, rep = encode_source(s, "k", tok, DataSpec(train=[s], max_length=64, on_overflow="drop"))
    assert (rep.rows, rep.used, rep.dropped_overflow, rep.truncated) == (4, 3, 1, 0)
    assert rep.max_tokens > 64
    rows, rep = encode_source(s, "k", tok, DataSpec(train=[s], max_length=64, on_overflow="truncate"))
    assert (rep.used, rep.truncated) == (4, 1)
    assert all(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 64 for r in rows)
    assert rep.tokens == sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    with pytest.raises(DataError, match=r"row 4: \d+ tokens, more than data.max_length=64"):
        encode_source(s, "k", tok, DataSpec(train=[s], max_length=64, on_overflow="error"))


def test_bad_pair_names_file_and_row_or_is_counted(tmp_path, tok):
    rows = _rows(0) + [{"prompt": "q", "chosen": "x", "rejected": "x"}]
    f = write(tmp_path / "p.jsonl", rows)
    s = src(source=str(f))
    with pytest.raises(DataError, match=r"p.jsonl row 4: chosen and rejected are identical"):
        encode_source(s, "k", tok, DataSpec(train=[s]))
    _, rep = encode_source(s, "k", tok, DataSpec(train=[s], on_bad_row="skip"))
    assert (rep.used, rep.skipped_bad) == (3, 1) and "identical" in rep.bad_examples[0]


PREF_RECIPE = """\
model: {{path: "builtin:tiny-llama"}}
data:
  train: [{{source: {source}, format: {fmt}}}]
  max_length: 128
method: {{name: {method}}}
train: {{output_dir: runs/x}}
"""


@pytest.mark.parametrize("case, rows, fmt, method, expect", [
    ("identical", _rows(0) + [{"prompt": "q", "chosen": "x", "rejected": "x"}], "preference", "dpo",
     ["p.jsonl row 4", "chosen and rejected are identical"]),
    ("missing-rejected", [{"prompt": [U], "chosen": [GOOD_A]}], "preference", "reward",
     ["p.jsonl row 1", "missing field 'rejected'"]),
    ("empty-prompt", _rows(0) + [{"prompt": "", "chosen": "a", "rejected": "b"}], "preference", "dpo",
     ["p.jsonl row 4", "prompt is empty"]),
    ("sft-format-for-dpo", _rows(0), "messages", "dpo",
     ["data.train[0].format", "format 'messages' does not fit method 'dpo'", "use one of: preference"]),
    ("preference-for-sft", _rows(0), "preference", "sft",
     ["data.train[0].format", "format 'preference' does not fit method 'sft'"]),
    ("reward-on-sft-data", [{"messages": [U, GOOD_A]}], "preference", "reward",
     ["p.jsonl row 1", "missing field 'chosen'"]),
])
def test_validate_catches_bad_preference_input(case, rows, fmt, method, expect, tmp_path, run_cli):
    write(tmp_path / "p.jsonl", rows)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(PREF_RECIPE.format(source="p.jsonl", fmt=fmt, method=method))
    rc, out, err = run_cli("validate", recipe)
    assert rc == 2, (out, err)
    for s in expect:
        assert s in err, f"{s!r} not in:\n{err}"
    assert "Traceback" not in out + err


def test_validate_reports_reward_recipe_on_sft_builtin(tmp_path, run_cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(PREF_RECIPE.format(source='"builtin:quickstart/sft"', fmt="preference", method="reward"))
    rc, _, err = run_cli("validate", recipe)
    assert rc == 2 and "builtin:quickstart/sft row 1" in err and "missing field 'chosen'" in err
    assert "more bad rows" in err  # every row is checked, the first ten are listed


def test_missing_starting_run_is_named_before_loading(tmp_path, run_cli):
    rc, out, err = run_cli("train", "recipes/quickstart/dpo.yaml", "--set", f"model.path={tmp_path}/sft/final",
                           "--set", f"train.output_dir={tmp_path}/dpo")
    assert rc == 2 and "model.path:" in err and "does not exist" in err and "train the run" in err
    assert not (tmp_path / "dpo").exists()  # stopped before the run directory or any weights
