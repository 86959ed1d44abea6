"""Reward specs, built-in rewards, user functions and their errors, reward models, TRL adapters."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
from pydantic import ValidationError

from tunelab.rewards import RewardSpec, required_columns, reward_problems
from tunelab.rewards.builtin import accuracy, format, length, normalise, numeric, parse_number, think_answer
from tunelab.rewards.compute import RewardError, build_rewards, score_all, trl_reward_funcs

# ---- built-ins ------------------------------------------------------------------------------


def test_accuracy_normalises_case_space_quotes_and_final_stop() -> None:
    comps = ["A Frost  bell is WHITE.", "'a frost bell is white'", "<answer> a frost bell is white </answer>",
             "A frost bell is red.", "A frost bell is white. Yes.", "a frost bell is white!?"]
    got = accuracy([""] * 6, comps, column="answer", answer=["A frost bell is white."] * 6)
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert accuracy([""], ["x"], column="ref", ref=[None]) == [None]
    assert normalise('  "Hello   World!" ') == "hello world"
    assert normalise("reasoning <answer>\n'Paris.'\n</answer> more") == "paris"


def test_accuracy_without_its_column_names_the_columns_there() -> None:
    with pytest.raises(KeyError, match="no column 'answer'.*solution"):
        accuracy(["q"], ["a"], column="answer", solution=["a"])


@pytest.mark.parametrize("text,want", [
    ("the total is 1,234 apples", 1234.0), ("1,234, then 5 more: 1,239", 1239.0), ("-3.5", -3.5),
    ("x \\boxed{12} y 99", 12.0), ("<answer>7</answer> then 8", 7.0), ("<answer>it is -2.5 m</answer>", -2.5),
    ("2 plus 3 is 5.", 5.0), ("pages 3-5", 5.0), ("$1,000,000.50", 1000000.5), ("none", None), ("", None),
    (42, 42.0), (2.5, 2.5), ("#### 72", 72.0), (None, None), (True, None),
])
def test_numeric_answer_parsing(text: object, want: float | None) -> None:
    assert parse_number(text) == want


def test_numeric_reward() -> None:
    got = numeric([""] * 6, ["2 plus 3 is 5.", "it is 6", "no idea", "5.0000000001", "\\boxed{5} (not 6)", "5"],
                  column="answer", answer=[5, "5", 5.0, "5", "5", "no number"])
    assert got == [1.0, 0.0, 0.0, 1.0, 1.0, None]


def test_format_length_think_answer() -> None:
    assert format([""] * 4, ["A x is red.", " A x is red. ", "x is red", "A x\ny is red."],
                  pattern=r"A .+ is \w+\.") == [1.0, 1.0, 0.0, 1.0]
    got = length([""] * 5, ["a" * 10, "a" * 15, "a" * 20, "a" * 30, ""], target=10)
    assert got == [0.0, -0.5, -1.0, -1.0, 0.0]
    assert math.copysign(1.0, got[0]) == 1.0  # no -0.0 in the logs
    comps = ["<think>hmm</think> <answer>4</answer>", "\n<think>a\nb</think>\n<answer>4</answer>\n",
             "<answer>4</answer>", "<think>a</think><answer> </answer>", "<think>a</think>\n<answer>4</answer> extra",
             "<think>a</think><answer>4</answer><answer>5</answer>", "<think>a</think>"]
    assert think_answer([""] * 7, comps) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


# ---- specs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,message", [
    ({}, "exactly one of name.*it has none"),
    ({"name": "accuracy", "model": "runs/x"}, "not name and model"),
    ({"name": "accuracy", "function": "a.b:c", "model": "runs/x"}, "not name and function and model"),
    ({"name": "accuracy", "pattern": "x"}, "pattern does not apply to the built-in 'accuracy', which takes column"),
    ({"name": "format"}, "needs pattern"),
    ({"name": "format", "pattern": "(unclosed"}, "'\\(unclosed' is not a valid regular expression"),
    ({"name": "length"}, "needs target"),
    ({"name": "length", "target": 0}, "greater than or equal to 1"),
    ({"function": "not a path"}, "package.module:function"),
    ({"function": "pkg.mod"}, "package.module:function"),
    ({"function": "pkg.mod:fn", "column": "answer"}, "column does not apply to a user function"),
    ({"model": "runs/rm", "target": 3}, "target does not apply to a reward model"),
    ({"name": "acuracy"}, "accuracy"),
    ({"name": "accuracy", "weight": float("nan")}, "finite"),
])
def test_spec_errors(spec: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RewardSpec(**spec)


def test_required_columns_and_labels() -> None:
    specs = [RewardSpec(name="accuracy"), RewardSpec(name="numeric", column="solution"),
             RewardSpec(model="runs/quickstart-reward/final/"), RewardSpec(model="org/rm-7b"),
             RewardSpec(function="a.b:brevity"), RewardSpec(name="format", pattern="x")]
    assert required_columns(specs) == {"answer", "solution"}
    assert [s.label for s in specs] == ["accuracy", "numeric", "rm:quickstart-reward", "rm:rm-7b", "brevity", "format"]


def test_a_dumped_spec_loads_again() -> None:
    """The lock file holds model_dump() of every spec, defaults included: it must validate again."""
    for spec in (RewardSpec(name="format", pattern="<a>.*</a>"), RewardSpec(name="length", target=5),
                 RewardSpec(model="runs/rm"), RewardSpec(function="a.b:c", weight=-0.5), RewardSpec(name="accuracy")):
        assert RewardSpec(**spec.model_dump(mode="json")) == spec


def test_rewards_module_imports_no_torch() -> None:
    code = "import sys, tunelab.rewards; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- user functions -------------------------------------------------------------------------


@pytest.fixture
def user_package(tmp_path, monkeypatch) -> str:
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
        def not_a_list(prompts, completions, **kw):
            return 1.0
        def nan_second(prompts, completions, **kw):
            return [0.5, float("nan")]
        def uses_column(prompts, completions, task, **kw):
            return [float(t == "colour") for t in task]
        NOT_CALLABLE = 3
    """))
    (pkg / "broken.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "myrewards.fns"


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


def test_reward_problems_for_functions(user_package: str) -> None:
    specs = [RewardSpec(function="nosuchpkg.mod:fn"), RewardSpec(function=f"{user_package}:shrot"),
             RewardSpec(function=f"{user_package}:NOT_CALLABLE"), RewardSpec(function="myrewards.broken:f"),
             RewardSpec(function=f"{user_package}:short"), RewardSpec(name="accuracy")]
    problems, notes = reward_problems(specs)
    assert [p.where for p in problems] == [f"method.rewards.{i}.function" for i in range(4)]
    assert "nosuchpkg" in problems[0].what and "importable from the current directory" in problems[0].hint
    assert "no attribute 'shrot'" in problems[1].what and "myrewards.fns:short" in problems[1].hint
    assert "is a int, not a function" in problems[2].what
    assert "SyntaxError" in problems[3].what
    assert notes == []


def test_reward_problems_for_models(tmp_path) -> None:
    causal = tmp_path / "causal"
    causal.mkdir()
    (causal / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    run = tmp_path / "rm-run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    seq_adapter, lm_adapter, empty = tmp_path / "seq", tmp_path / "lm", tmp_path / "empty"
    for d, task in ((seq_adapter, "SEQ_CLS"), (lm_adapter, "CAUSAL_LM"), (empty, None)):
        d.mkdir()
        if task:
            (d / "adapter_config.json").write_text(json.dumps({"task_type": task}))
    paths = [causal, run, run / "final", seq_adapter, lm_adapter, empty, tmp_path / "not-yet" / "final"]
    problems, notes = reward_problems([RewardSpec(model=str(p)) for p in paths] + [RewardSpec(model="org/rm")])
    assert [p.where for p in problems] == [f"method.rewards.{i}.model" for i in (0, 4, 5)]
    assert "not a reward model (LlamaForCausalLM)" in problems[0].what and "method: reward" in problems[0].hint
    assert "CAUSAL_LM adapter, not a reward model" in problems[1].what
    assert "holds no model" in problems[2].what
    assert len(notes) == 1 and notes[0].startswith("method.rewards.6.model: ") and "does not exist" in notes[0]


# ---- scoring and TRL ------------------------------------------------------------------------


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


# ---- reward models --------------------------------------------------------------------------


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
