"""Scoring (rewards/compute.py): user functions and their errors, weights, TRL adapters, reward models."""

from __future__ import annotations

import pytest

from tunelab.rewards import RewardSpec
from tunelab.rewards.compute import RewardError, build_rewards, score_all, trl_reward_funcs


def test_user_functions_and_their_errors(user_package: str) -> None:
    names = ("short", "boom", "too_few", "words", "uses_column", "not_a_list", "nan_second")
    ok, boom, few, words, col, scalar, nan = build_rewards([RewardSpec(function=f"{user_package}:{n}") for n in names])
    assert ok(["q", "q"], ["hi", "a long one"]) == [1.0, 0.0]
    assert col(["q", "q"], ["a", "b"], task=["colour", "sum"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match=r"'boom' \(function myrewards.fns:boom\) raised ValueError: "
                                          r"no reference for this task on a batch of 2.*'What is 2\?'.*'4'") as err:
        boom(["What is 2?", "x"], ["4", "5"])
    assert isinstance(err.value.__cause__, ValueError)
    with pytest.raises(RewardError, match=r"'too_few'.*returned 1 values for 2 completions \(expected 2, got 1\)"):
        few(["a", "b"], ["c", "d"])
    with pytest.raises(RewardError, match=r"'words'.*returned 'good' \(str\) at index 0"):
        words(["a"], ["c"])
    with pytest.raises(RewardError, match=r"'not_a_list'.*returned a float; it must return a list"):
        scalar(["a"], ["c"])
    with pytest.raises(RewardError, match=r"'nan_second'.*returned nan at index 1"):
        nan(["a", "b"], ["c", "d"])


def test_a_user_function_missing_a_column_says_what_it_was_called_with(user_package: str) -> None:
    (col,) = build_rewards([RewardSpec(function=f"{user_package}:uses_column")])
    with pytest.raises(RewardError, match=r"TypeError.*columns: answer"):
        col(["q"], ["a"], answer=["x"])


def test_score_all_weights_and_none(user_package: str) -> None:
    funcs = build_rewards([RewardSpec(name="accuracy", weight=2.0),
                           RewardSpec(function=f"{user_package}:short", weight=0.5)])
    total, per = score_all(funcs, ["q"] * 3, ["yes", "no", "a long answer"], {"answer": ["yes", None, "x"]})
    assert per == {"accuracy": [1.0, None, 0.0], "short": [1.0, 1.0, 0.0]}
    assert total == [2.5, 0.5, 0.0]
    (acc,) = build_rewards([RewardSpec(name="accuracy")])
    assert score_all([acc], ["q"], ["a"], {"answer": [None]}) == ([0.0], {"accuracy": [None]})


def test_trl_adapters_take_conversations_and_drop_trl_kwargs(user_package: str) -> None:
    acc, fn = trl_reward_funcs(build_rewards([RewardSpec(name="accuracy", weight=3.0),
                                              RewardSpec(function=f"{user_package}:uses_column")]))
    assert (acc.__name__, fn.__name__) == ("accuracy", "uses_column")
    prompts = [[{"role": "system", "content": "s"}, {"role": "user", "content": "What colour is a frost bell?"}]] * 2
    completions = [[{"role": "assistant", "content": "A frost bell is white."}],
                   [{"role": "assistant", "content": "A frost bell is red."}]]
    trl_kwargs = {"completion_ids": [[1], [2]], "trainer_state": object(), "log_extra": print, "log_metric": print}
    got = acc(prompts=prompts, completions=completions, answer=["A frost bell is white."] * 2, **trl_kwargs)
    assert got == [1.0, 0.0]  # unweighted: TRL applies the weight
    # a user function sees strings and only the dataset's columns (not TRL's kwargs, not other-length values)
    assert fn(prompts=["p1", "p2"], completions=["c1", "c2"], task=["colour", "sum"], n_other=[1],
              **trl_kwargs) == [1.0, 0.0]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    from tunelab.models.builtin import builtin_model, builtin_tokenizer

    path = tmp_path_factory.mktemp("rm") / "final"
    tok = builtin_tokenizer()
    model = builtin_model("tiny-llama", head="score")
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _direct_score(model, tok, prompt: str, completion: str, keep: int | None = None) -> float:
    """Score of one unpadded conversation, read off the body's last hidden state by hand."""
    import torch

    ids = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                                  tokenize=True, return_dict=True)["input_ids"][:keep]
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return model.score(hidden).item()


def test_reward_model_scores_equal_a_direct_forward(reward_model_dir) -> None:
    from transformers import AutoModelForSequenceClassification

    from tunelab.models.builtin import builtin_tokenizer

    (f,) = build_rewards([RewardSpec(model=str(reward_model_dir.parent))])  # the run dir: its final/ loads
    assert f.label == "rm:" + reward_model_dir.parent.name
    prompts = ["What colour is a frost bell?", "Hi", "What is 2 plus 2?"]
    comps = ["A frost bell is white.", "Hello! How can I help you today? I am here to help.", "4"]
    got = f(prompts, comps)
    assert len({len(s) for s in f.encode(prompts, comps)}) == 3  # three lengths: the batch is padded
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tok = builtin_tokenizer()
    want = [_direct_score(model, tok, p, c) for p, c in zip(prompts, comps)]
    assert got == pytest.approx(want, abs=1e-5)
    assert len({round(g, 6) for g in got}) == 3  # guard: the rows really are scored differently
    assert f.truncated == 0


def test_reward_model_cuts_long_pairs_and_counts_them(reward_model_dir) -> None:
    from transformers import AutoModelForSequenceClassification

    from tunelab.models.builtin import builtin_tokenizer

    (f,) = build_rewards([RewardSpec(model=str(reward_model_dir), max_length=12)])
    prompts, comps = ["Hi", "What is 2 plus 2?"], ["A frost bell is white, and so is snow.", "4"]
    lengths = [len(s) for s in build_rewards([RewardSpec(model=str(reward_model_dir))])[0].encode(prompts, comps)]
    assert lengths[0] > 12 and lengths[1] > 12  # both are cut
    got = f(prompts, comps)
    assert f.truncated == 2 and all(len(s) == 12 for s in f.encode(prompts, comps))
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    want = [_direct_score(model, builtin_tokenizer(), p, c, keep=12) for p, c in zip(prompts, comps)]
    assert got == pytest.approx(want, abs=1e-5)


def test_trl_adapter_gives_a_reward_model_the_whole_conversation(reward_model_dir) -> None:
    (f,) = build_rewards([RewardSpec(model=str(reward_model_dir))])
    (adapter,) = trl_reward_funcs([f])
    system = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}]
    got = adapter(prompts=[system], completions=[[{"role": "assistant", "content": "Hello"}]], completion_ids=[[1]])
    want = f.call(["Hi"], ["Hello"], {}, conversations=[system])
    assert got == want and got != f(["Hi"], ["Hello"])  # the system message is scored too
