"""Reward specs and their checks (rewards/__init__.py): spec errors, columns and labels, user functions and reward
models that cannot be used, no torch on import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from tunelab.rewards import RewardSpec, required_columns, reward_problems


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
