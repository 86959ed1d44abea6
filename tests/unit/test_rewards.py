"""Reward specs, built-in rewards, user functions and their errors, reward models, TRL adapters."""

from __future__ import annotations

import textwrap

import pytest
from pydantic import ValidationError

from tunelab.rewards import RewardSpec, required_columns, reward_problems
from tunelab.rewards.builtin import accuracy, format, length, normalise, numeric, parse_number, think_answer
from tunelab.rewards.compute import RewardError, build_rewards, score_all, trl_reward_funcs


def test_accuracy_normalises_case_space_quotes_and_final_stop() -> None:
    comps = ["A Frost  bell is WHITE.", "'a frost bell is white'", "<answer> a frost bell is white </answer>",
             "A frost bell is red.", "A frost bell is white. Yes."]
    got = accuracy([""] * 5, comps, column="answer", answer=["A frost bell is white."] * 5)
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert accuracy([""], ["x"], column="ref", ref=[None]) == [None]
    assert normalise('  "Hello   World!" ') == "hello world"


@pytest.mark.parametrize("text,want", [("the total is 1,234 apples", 1234.0), ("-3.5", -3.5), ("x \\boxed{12} y 99", 12.0),
                                       ("<answer>7</answer> then 8", 7.0), ("2 plus 3 is 5.", 5.0), ("none", None)])
def test_numeric_answer_parsing(text: str, want: float | None) -> None:
    assert parse_number(text) == want


def test_numeric_reward() -> None:
    got = numeric([""] * 4, ["2 plus 3 is 5.", "it is 6", "no idea", "5.0000000001"], column="answer",
                  answer=[5, "5", 5.0, "5"])
    assert got == [1.0, 0.0, 0.0, 1.0]


def test_format_length_think_answer() -> None:
    assert format([""] * 3, ["A x is red.", " A x is red. ", "x is red"], pattern=r"A .+ is \w+\.") == [1.0, 1.0, 0.0]
    assert length([""] * 3, ["a" * 10, "a" * 15, "a" * 30], target=10) == [0.0, -0.5, -1.0]
    comps = ["<think>hmm</think> <answer>4</answer>", "<answer>4</answer>", "<think>a</think><answer> </answer>",
             "<think>a</think>\n<answer>4</answer> extra"]
    assert think_answer([""] * 4, comps) == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("spec,message", [
    ({}, "exactly one of"),
    ({"name": "accuracy", "model": "runs/x"}, "exactly one of"),
    ({"name": "accuracy", "pattern": "x"}, "pattern does not apply"),
    ({"name": "format"}, "needs pattern"),
    ({"name": "format", "pattern": "(unclosed"}, "not a valid regular expression"),
    ({"name": "length"}, "needs target"),
    ({"function": "not a path"}, "package.module:function"),
    ({"function": "pkg.mod:fn", "column": "answer"}, "does not apply to a user function"),
    ({"name": "acuracy"}, "accuracy"),
])
def test_spec_errors(spec: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RewardSpec(**spec)


def test_required_columns_and_labels() -> None:
    specs = [RewardSpec(name="accuracy"), RewardSpec(name="numeric", column="solution"),
             RewardSpec(model="runs/quickstart-reward/final"), RewardSpec(function="a.b:brevity")]
    assert required_columns(specs) == {"answer", "solution"}
    assert [s.label for s in specs] == ["accuracy", "numeric", "rm:quickstart-reward", "brevity"]


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "myrewards"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "fns.py").write_text(textwrap.dedent("""
        def short(prompts, completions, **kw):
            return [1.0 if len(c) < 5 else 0.0 for c in completions]
        def boom(prompts, completions, **kw):
            raise ValueError("no reference for this task")
        def too_few(prompts, completions, **kw):
            return [1.0]
        def words(prompts, completions, **kw):
            return ["good" for _ in completions]
        def uses_column(prompts, completions, task, **kw):
            return [float(t == "colour") for t in task]
        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "myrewards.fns"


def test_user_functions_and_their_errors(user_package: str) -> None:
    ok, boom, few, words, col = build_rewards([RewardSpec(function=f"{user_package}:{n}")
                                               for n in ("short", "boom", "too_few", "words", "uses_column")])
    assert ok(["q", "q"], ["hi", "a long one"]) == [1.0, 0.0]
    assert col(["q", "q"], ["a", "b"], task=["colour", "sum"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match=r"'boom'.*ValueError: no reference for this task.*'What is 2\?'"):
        boom(["What is 2?", "x"], ["4", "5"])
    with pytest.raises(RewardError, match=r"returned 1 values for 2 completions \(expected 2\)"):
        few(["a", "b"], ["c", "d"])
    with pytest.raises(RewardError, match=r"'words'.*returned 'good' at index 0"):
        words(["a"], ["c"])


def test_reward_problems_at_validate(user_package: str, tmp_path) -> None:
    specs = [RewardSpec(function="nosuchpkg.mod:fn"), RewardSpec(function=f"{user_package}:missing"),
             RewardSpec(function=f"{user_package}:NOT_CALLABLE"), RewardSpec(function=f"{user_package}:short")]
    problems, _ = reward_problems(specs)
    assert [p.where for p in problems] == ["method.rewards.0.function", "method.rewards.1.function",
                                           "method.rewards.2.function"]
    assert "nosuchpkg" in problems[0].what and "importable" in problems[0].hint
    causal = tmp_path / "causal"
    causal.mkdir()
    (causal / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    problems, _ = reward_problems([RewardSpec(model=str(causal))])
    assert problems[0].where == "method.rewards.0.model" and "not a reward model" in problems[0].what


def test_score_all_weights_and_none(user_package: str) -> None:
    funcs = build_rewards([RewardSpec(name="accuracy", weight=2.0), RewardSpec(function=f"{user_package}:short",
                                                                                 weight=0.5)])
    total, per = score_all(funcs, ["q"] * 3, ["yes", "no", "a long answer"], {"answer": ["yes", None, "x"]})
    assert per == {"accuracy": [1.0, None, 0.0], "short": [1.0, 1.0, 0.0]}
    assert total == [2.5, 0.5, 0.0]


def test_trl_adapters_take_conversations_and_drop_trl_kwargs() -> None:
    (adapter,) = trl_reward_funcs(build_rewards([RewardSpec(name="accuracy")]))
    assert adapter.__name__ == "accuracy"
    prompts = [[{"role": "system", "content": "s"}, {"role": "user", "content": "What colour is a frost bell?"}]] * 2
    completions = [[{"role": "assistant", "content": "A frost bell is white."}],
                   [{"role": "assistant", "content": "A frost bell is red."}]]
    got = adapter(prompts=prompts, completions=completions, completion_ids=[[1], [2]], trainer_state=object(),
                  answer=["A frost bell is white."] * 2)
    assert got == [1.0, 0.0]


def test_reward_model_scores_equal_a_direct_forward(tmp_path) -> None:
    import torch

    from tunelab.models.builtin import builtin_model, builtin_tokenizer

    tok = builtin_tokenizer()
    model = builtin_model("tiny-llama", head="score")
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    (f,) = build_rewards([RewardSpec(model=str(tmp_path / "rm"))])
    prompts = ["What colour is a frost bell?", "Hi", "What is 2 plus 2?"]
    comps = ["A frost bell is white.", "Hello! How can I help you today? I am here.", "4"]
    got = f(prompts, comps)
    model.eval()
    for p, c, g in zip(prompts, comps, got):
        ids = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                      tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert g == pytest.approx(want, abs=1e-5)
    assert len(set(round(g, 6) for g in got)) == 3
