"""`tunelab validate` (recipe/validate.py): malformed recipes and overrides exit 2 with the key named, the fix
suggested, no traceback, fast, and found before torch, transformers or TRL is imported; `train` stops the same way
before loading; rows the chat template cannot render, bad preference input, the eos note."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tunelab.data.formats import BadRow
from tunelab.errors import UserError
from tunelab.models.builtin import builtin_tokenizer
from tunelab.recipe.load import load_recipe
from tunelab.recipe.validate import control_for_checks, reward_row_checks, validate
from tunelab.rewards import RewardSpec


GOOD = """\
model: {path: "builtin:tiny-llama"}
data:
  train: [{source: "builtin:quickstart/sft", format: messages}]
  max_length: 256
method: {name: sft}
train: {output_dir: runs/x, learning_rate: 1.0e-3}
"""


MLA = "patches: [{{name: mla, kv_lora_rank: 32, {}}}]\n"


# id -> (recipe text, --set overrides, substrings stderr must contain)
CASES = {
    "empty-file": ("", [], ["recipe file is empty"]),
    "top-level-list": ("- a\n- b\n", [], ["must be a mapping"]),
    "yaml-syntax": (GOOD + "train: {epochs: [1, 2\n", [], ["YAML syntax error", "recipe.yaml:8:1"]),
    "misspelt-top": (GOOD.replace("method:", "mehtod:"), [], ["mehtod: unknown key", "did you mean 'method'?"]),
    "misspelt-model": (GOOD.replace("{path:", "{pth:"), [], ["model.pth: unknown key", "did you mean 'path'?"]),
    "misspelt-data": (GOOD.replace("max_length", "max_lenght"), [],
                      ["data.max_lenght: unknown key", "did you mean 'max_length'?"]),
    "misspelt-source-key": (GOOD.replace("format: messages", "fromat: messages"), [],
                            ["data.train[0].fromat: unknown key", "did you mean 'format'?"]),
    "misspelt-method": (GOOD.replace("{name: sft}", "{name: sft, loss_typ: nll}"), [],
                        ["method.loss_typ: unknown key", "did you mean 'loss_type'?"]),
    "misspelt-train": (GOOD.replace("learning_rate", "learnig_rate"), [],
                       ["train.learnig_rate: unknown key", "did you mean 'learning_rate'?"]),
    "misspelt-peft": (GOOD + "peft: {method: lora, rank: 8}\n", [], ["peft.rank: unknown key"]),
    "misspelt-peft-alpha": (GOOD + "peft: {method: lora, alpah: 8}\n", [],
                            ["peft.alpah: unknown key", "did you mean 'alpha'?"]),
    "misspelt-distributed": (GOOD + "distributed: {stratgy: none}\n", [],
                             ["distributed.stratgy: unknown key", "did you mean 'strategy'?"]),
    "misspelt-quantization": (GOOD.replace('{path: "builtin:tiny-llama"}',
                                           '{path: "builtin:tiny-llama", quantization: {bitz: 4}}')
                              + "peft: {method: lora}\n", [], ["model.quantization.bitz: unknown key",
                                                               "did you mean 'bits'?"]),
    "unknown-method": (GOOD.replace("{name: sft}", "{name: sfd}"), [],
                       ["method.name: unknown method 'sfd'", "did you mean 'sft'?"]),
    "missing-method-name": (GOOD.replace("{name: sft}", "{loss_type: nll}"), [], ["method.name", "missing"]),
    "unknown-format": (GOOD.replace("format: messages", "format: chatml"), [],
                       ["data.train[0].format", "'chatml'"]),
    "unknown-peft": (GOOD + "peft: {method: lorra}\n", [], ["peft.method: unknown method 'lorra'",
                                                            "did you mean 'lora'?"]),
    "unknown-patch": (GOOD + "patches: [{name: rop, method: yarn}]\n", [],
                      ["patches[0].name", "unknown name 'rop'", "did you mean 'rope'?"]),
    "rope-without-factor": (GOOD + "patches: [{name: rope, method: yarn}]\n", [],
                            ["patches[0]", "give factor (e.g. factor: 4) or target_length"]),
    "rope-unknown-method": (GOOD + "patches: [{name: rope, method: yarm, factor: 4}]\n", [],
                            ["patches[0].method", "yarn"]),
    "mla-odd-rope-dim": (GOOD + MLA.format("rope_dim: 7"), [], ["patches[0].rope_dim", "is odd", "use 6 or 8"]),
    "mla-missing-rope-dim": (GOOD + "patches: [{name: mla, kv_lora_rank: 32}]\n", [],
                             ["patches[0].rope_dim: required key is missing"]),
    "mla-rank-zero": (GOOD + "patches: [{name: mla, kv_lora_rank: 0, rope_dim: 8}]\n", [],
                      ["patches[0].kv_lora_rank", "greater than or equal to 1"]),
    "mla-misspelt-key": (GOOD + MLA.format("rope_dim: 8, partial_rop: high"), [],
                         ["patches[0].partial_rop: unknown key", "did you mean 'partial_rope'?"]),
    "mla-unknown-partial-rope": (GOOD + MLA.format("rope_dim: 8, partial_rope: hgh"), [],
                                 ["patches[0].partial_rope", "did you mean 'high'?"]),
    "mla-2-norm-without-calibration": (GOOD + MLA.format("rope_dim: 8, partial_rope: 2-norm"), [],
                                       ["patches[0].calibration_data", "give calibration_data"]),
    "mla-missing-calibration-file": (GOOD + MLA.format("rope_dim: 8, calibration_data: no/such.jsonl"), [],
                                     ["patches[0].calibration_data", "data file not found"]),
    "mla-calibration-columns": (GOOD + MLA.format('rope_dim: 8, calibration_data: "builtin:quickstart/preference"'),
                                [], ["patches[0].calibration_data", "cannot tell the format",
                                     "set patches[0].calibration_format"]),
    "mla-twice": (GOOD + "patches: [{name: mla, kv_lora_rank: 32, rope_dim: 8}, {name: mla, kv_lora_rank: 8, "
                  "rope_dim: 4}]\n", [], ["patches[1]", "already converted to MLA by patches[0]"]),
    "mla-with-qlora": (GOOD + MLA.format("rope_dim: 8") + "peft: {method: qlora}\n", [],
                       ["patches[0]", "peft.method: qlora", "use peft.method: lora"]),
    "mla-flash-attention": (GOOD.replace('{path: "builtin:tiny-llama"}', '{path: "builtin:tiny-llama", '
                                         'attn_implementation: flash_attention_2}') + MLA.format("rope_dim: 8"), [],
                            ["model.attn_implementation", "eager or sdpa", "use sdpa"]),
    "mla-reward-model": (GOOD.replace("{name: sft}", "{name: reward}").replace(
        '"builtin:quickstart/sft", format: messages', '"builtin:quickstart/preference", format: preference')
        + MLA.format("rope_dim: 8"), [], ["patches[0]", "method reward trains a sequence classifier"]),
    "unknown-builtin-model": (GOOD.replace("tiny-llama", "tiny-gpt"), [],
                              ["model.path", "unknown built-in model 'builtin:tiny-gpt'", "builtin:tiny-llama"]),
    "unknown-attn": (GOOD.replace('{path: "builtin:tiny-llama"}', '{path: "builtin:tiny-llama", '
                                  'attn_implementation: flash}'), [], ["model.attn_implementation", "'flash'"]),
    "missing-model": ("\n".join(GOOD.splitlines()[1:]) + "\n", [], ["model: required key is missing"]),
    "missing-train-data": (GOOD.replace('  train: [{source: "builtin:quickstart/sft", format: messages}]\n', ""),
                           [], ["data.train: required key is missing"]),
    "empty-train-list": (GOOD.replace('[{source: "builtin:quickstart/sft", format: messages}]', "[]"), [],
                         ["data.train", "at least 1"]),
    "lr-negative": (GOOD.replace("1.0e-3", "-1.0e-3"), [], ["train.learning_rate", "greater than 0"]),
    "lr-too-big": (GOOD.replace("1.0e-3", "3"), [], ["train.learning_rate", "less than 1"]),
    "lr-not-number": (GOOD.replace("1.0e-3", "fast"), [], ["train.learning_rate", "valid number", "'fast'"]),
    "lora-r-zero": (GOOD + "peft: {method: lora, r: 0}\n", [], ["peft.r", "greater than or equal to 1"]),
    "dropout-too-big": (GOOD + "peft: {method: lora, dropout: 1.5}\n", [], ["peft.dropout", "less than 1"]),
    "max-length-zero": (GOOD.replace("max_length: 256", "max_length: 0"), [], ["data.max_length",
                                                                               "greater than or equal to 8"]),
    "eval-split-one": (GOOD.replace("max_length: 256", "max_length: 256\n  eval_split: 1.0"), [],
                       ["data.eval_split", "less than 1"]),
    "batch-size-string": (GOOD.replace("learning_rate: 1.0e-3", "learning_rate: 1.0e-3, batch_size: many"), [],
                          ["train.batch_size", "valid integer", "'many'"]),
    "bool-wrong": (GOOD.replace("max_length: 256", "max_length: 256\n  packing: perhaps"), [],
                   ["data.packing", "valid boolean"]),
    "unknown-overflow": (GOOD.replace("max_length: 256", "max_length: 256\n  on_overflow: trunc"), [],
                         ["data.on_overflow", "did you mean 'truncate'?"]),
    "weight-and-samples": (GOOD.replace("format: messages}", "format: messages, weight: 1, samples: 3}"), [],
                           ["data.train[0]", "either weight or samples"]),
    "quant-without-peft": (GOOD.replace('{path: "builtin:tiny-llama"}',
                                        '{path: "builtin:tiny-llama", quantization: {bits: 4}}'), [],
                           ["cannot be fully fine-tuned", "qlora"]),
    "missing-data-file": (GOOD.replace('"builtin:quickstart/sft"', "no/such/file.jsonl"), [],
                          ["data.train[0].source", "data file not found"]),
    "unknown-builtin-data": (GOOD.replace('"builtin:quickstart/sft"', '"builtin:quickstart/nope"'), [],
                             ["data.train[0].source", "unknown built-in dataset", "builtin:quickstart/sft"]),
    "env-unset": (GOOD.replace("runs/x", "\"${env:TUNELAB_TEST_UNSET_VAR}/x\""), [],
                  ["train.output_dir", "TUNELAB_TEST_UNSET_VAR is not set"]),
    "set-no-equals": (GOOD, ["train.epochs"], ["--set train.epochs", "expected dotted.key=value"]),
    "set-unknown-key": (GOOD, ["train.epoch=3"], ["train.epoch: unknown key", "did you mean 'epochs'?"]),
    "set-wrong-type": (GOOD, ["train.batch_size=big"], ["train.batch_size", "valid integer"]),
    "set-out-of-range": (GOOD, ["train.warmup_ratio=2"], ["train.warmup_ratio", "less than 1"]),
    "set-unknown-method": (GOOD, ["method.name=ppo2"], ["unknown method 'ppo2'"]),
}


FILES = {  # cases that need more than one file: name -> {filename: text}
    "extends-cycle": {"recipe.yaml": "extends: b.yaml\n" + GOOD, "b.yaml": "extends: recipe.yaml\n"},
    "extends-missing": {"recipe.yaml": "extends: ../nowhere/base.yaml\n" + GOOD},
    "extends-unknown-builtin": {"recipe.yaml": "extends: builtin:quickstart/bsae\n" + GOOD},
}


FILE_EXPECT = {
    "extends-cycle": ["extends cycle: recipe.yaml -> b.yaml -> recipe.yaml"],
    "extends-missing": ["extends", "file not found"],
    "extends-unknown-builtin": ["no such built-in recipe", "did you mean builtin:quickstart/_base?"],
}


def make(tmp_path, case_id):
    if case_id in FILES:
        for name, text in FILES[case_id].items():
            (tmp_path / name).write_text(text)
        return tmp_path / "recipe.yaml", [], FILE_EXPECT[case_id]
    text, overrides, expect = CASES[case_id]
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path, overrides, expect


ALL = sorted(CASES) + sorted(FILES)


def test_there_are_enough_cases():
    assert len(ALL) >= 30


@pytest.mark.parametrize("case_id", ALL)
def test_validate_exits_2_and_names_the_key(case_id, tmp_path, run_cli):
    path, overrides, expect = make(tmp_path, case_id)
    args = ["validate", path] + [x for o in overrides for x in ("--set", o)]
    start = time.perf_counter()
    rc, out, err = run_cli(*args)
    elapsed = time.perf_counter() - start
    assert rc == 2, (out, err)
    for s in expect:
        assert s in err, f"{s!r} not in:\n{err}"
    assert "Traceback" not in out + err
    assert elapsed < 2.0, f"took {elapsed:.2f} s"


@pytest.mark.parametrize("case_id", ["misspelt-train", "missing-data-file", "extends-cycle", "set-wrong-type"])
def test_train_reports_the_same_before_loading(case_id, tmp_path, run_cli):
    path, overrides, expect = make(tmp_path, case_id)
    rc, out, err = run_cli("train", path, *[x for o in overrides for x in ("--set", o)])
    assert rc == 2 and all(s in err for s in expect) and "Traceback" not in out + err


def test_no_heavy_import_before_the_error(tmp_path):
    """One interpreter checks every case through the validate path and inspects sys.modules after each."""
    jobs = []
    for case_id in ALL:
        sub = tmp_path / case_id
        sub.mkdir()
        path, overrides, _ = make(sub, case_id)
        jobs.append((case_id, str(path), overrides))
    script = textwrap.dedent("""
        import json, sys
        from tunelab.errors import UserError
        from tunelab.recipe.validate import validate
        results = {}
        for case_id, path, overrides in json.loads(sys.argv[1]):
            try:
                validate(path, overrides)
                results[case_id] = "no error"
            except UserError:
                heavy = [m for m in ("torch", "transformers", "trl") if m in sys.modules]
                results[case_id] = heavy
        print(json.dumps(results))
    """)
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results == {case_id: [] for case_id in ALL}


def test_all_problems_reported_at_once(tmp_path, run_cli):
    text = GOOD.replace("learning_rate", "learnig_rate").replace("max_length: 256", "max_length: -4")
    text = text.replace("{name: sft}", "{name: sft, neftune_noise_alpha: -1}") + "peft: {method: lora, r: 0}\n"
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    rc, _, err = run_cli("validate", path)
    assert rc == 2
    assert "4 problems" in err
    for key in ("train.learnig_rate", "data.max_length", "method.neftune_noise_alpha", "peft.r"):
        assert key in err


def test_bad_row_is_named_by_validate(tmp_path, run_cli):
    data = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "recipe.yaml"
    path.write_text(GOOD.replace('"builtin:quickstart/sft"', "d.jsonl"))
    rc, _, err = run_cli("validate", path)
    assert rc == 2 and "d.jsonl row 2" in err and "unknown role 'wizard'" in err


def test_good_recipe_passes(tmp_path, run_cli):
    path = tmp_path / "recipe.yaml"
    path.write_text(GOOD)
    rc, out, err = run_cli("validate", path)
    assert rc == 0, err
    assert "ok:" in out


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 3 plus 4?"},
    {"role": "assistant", "content": "It is 7."},
    {"role": "user", "content": "And 5 plus 5?"},
    {"role": "assistant", "content": "It is 10."},
]


# renders every turn the same way wherever it sits: the prefix difference is exact
CONSISTENT = ("{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] }}{% if m['role'] == 'assistant' %}"
              "{{ '<|im_end|>' }}{% endif %}{{ '\\n\\n' }}{% endfor %}{% if add_generation_prompt %}"
              "{{ '### assistant:\\n' }}{% endif %}")


# renders earlier assistant turns shortened, the last one in full (as Qwen3 drops earlier reasoning)
HISTORY_DIFFERS = ("{% for m in messages %}{{ '### ' + m['role'] + ':\\n' }}{% if m['role'] == 'assistant' and not loop.last "
                   "%}{{ m['content'][:4] }}{% else %}{{ m['content'] }}{% endif %}{% if m['role'] == 'assistant' %}"
                   "{{ '<|im_end|>' }}{% endif %}{{ '\\n\\n' }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '### assistant:\\n' }}{% endif %}")


def _recipe(tmp_path: Path, template: str | None, rows: list[dict], extra_model: str = "") -> Path:
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = ""
    if template is not None:
        (tmp_path / "t.jinja").write_text(template)
        line = "  chat_template: t.jinja\n"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  path: builtin:tiny-llama\n{line}{extra_model}data:\n"
                      f"  train: [{{source: {data.name}, format: messages}}]\nmethod: {{name: sft}}\n"
                      f"train: {{output_dir: {tmp_path / 'run'}, max_steps: 1}}\n")
    return recipe


def test_validate_stops_with_exit_2_on_a_template_that_renders_history_differently(tmp_path, run_cli):
    rows = [{"messages": CONVERSATION}] * 3
    code, out, err = run_cli("validate", _recipe(tmp_path, HISTORY_DIFFERS, rows))
    assert code == 2, out + err
    assert "model.chat_template" in err and "row 1" in err and "differently" in err
    assert "smollm2" in err  # the registry names are offered
    assert "Traceback" not in err
    code, out, err = run_cli("validate", _recipe(tmp_path, CONSISTENT, rows))
    assert code == 0, out + err
    assert "prefix difference, checked on every row" in out + err


def test_train_refuses_a_row_the_template_cannot_render_before_any_weights(tmp_path, run_cli):
    rows = [{"messages": CONVERSATION}, {"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": {}}}]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}]
    code, out, err = run_cli("train", _recipe(tmp_path, None, rows, "  chat_template: chatml\n"))
    assert code == 2, out + err
    assert "row 2" in err and "tool calls" in err and "qwen2.5" in err
    assert not (tmp_path / "run" / "final").exists()


def test_validate_says_when_the_tokenizers_eos_is_not_the_templates_end_of_turn(tmp_path, run_cli):
    """A model directory (config + tokenizer, no weights needed by validate) whose eos is the document end."""
    from tunelab.models.builtin import builtin_config

    model_dir = tmp_path / "model"
    builtin_config("tiny-llama").save_pretrained(model_dir)
    tok = builtin_tokenizer()
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(model_dir)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{path: {model_dir}, chat_template: chatml}}\n"
                      "data: {train: [{source: 'builtin:quickstart/sft'}]}\nmethod: {name: sft}\n")
    code, out, err = run_cli("validate", recipe)
    assert code == 0, out + err
    assert "eos token is '<|endoftext|>'" in out + err and "ends turns with '<|im_end|>'" in out + err


U = {"role": "user", "content": "What is 2 plus 2?"}


GOOD_A = {"role": "assistant", "content": "2 plus 2 is 4."}


BAD_A = {"role": "assistant", "content": "I don't know."}


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n_long: int = 1):
    rows = [{"prompt": [U], "chosen": [GOOD_A], "rejected": [BAD_A]} for _ in range(3)]
    long_answer = {"role": "assistant", "content": "word " * 200}
    rows += [{"prompt": [U], "chosen": [long_answer], "rejected": [BAD_A]} for _ in range(n_long)]
    return rows


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


def test_validate_reads_each_local_data_file_once(monkeypatch):
    """Checking every row, fingerprinting for the lock file and the template/reward checks share one read per file."""
    import hashlib
    from pathlib import Path

    from tunelab.recipe.validate import validate as check

    opened: list[str] = []
    real_open = Path.open

    def spy(self, *args, **kwargs):
        if self.suffix == ".jsonl":
            opened.append(self.name)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", spy)
    resolved = check("recipes/quickstart/sft.yaml")
    monkeypatch.undo()
    assert sorted(opened) == ["sft.jsonl", "sft_eval.jsonl"], opened
    for checked, fp in zip(resolved.sources, resolved.fingerprints()):
        assert fp["sha256"] == hashlib.sha256(checked.resolved.path.read_bytes()).hexdigest()
        assert checked.rows and fp["split"] == checked.key.split("[")[0].removeprefix("data.")


def test_validate_refuses_liger_kernels_without_the_package(tmp_path, run_cli):
    """`method.trl: {use_liger_kernel: true}` without liger-kernel: the Trainer would raise only after loading the
    weights; validate (and train, before loading) name the key."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    path = tmp_path / "recipe.yaml"
    path.write_text(GOOD)
    for command in ("validate", "train"):
        rc, out, err = run_cli(command, path, "--set", "method.trl={use_liger_kernel: true}")
        assert rc == 2, (out, err)
        assert "method.trl.use_liger_kernel" in err and "liger-kernel" in err and "Traceback" not in out + err


LM_EVAL_TASKS = Path(__file__).resolve().parents[2] / "assets" / "lm_eval"


def _needs_lm_eval():
    from tunelab.eval import harness

    if not harness.installed():
        if os.environ.get("CI"):
            pytest.fail('lm-eval is not installed (pip install -e ".[dev]")')
        pytest.skip('lm-eval is not installed (pip install "tunelab[lm-eval]")')


def test_validate_names_an_unknown_lm_eval_task_and_then_answers_fast(tmp_path, run_cli):
    """eval.lm_eval.tasks: a misspelt name exits 2 at validate (and at train, before loading), naming the entry
    and the closest name. The first check indexes lm-eval's own tasks (seconds) and caches their names; the
    next one answers under the 2 s of every other recipe error."""
    _needs_lm_eval()
    path = tmp_path / "recipe.yaml"
    path.write_text(GOOD + f"eval: {{lm_eval: {{tasks: [tinyfacts, arc_eazy], include: {LM_EVAL_TASKS}}}}}\n")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}  # cold: the index is built and cached here
    for command in ("validate", "train"):
        start = time.perf_counter()
        rc, out, err = run_cli(command, path, env=env)
        elapsed = time.perf_counter() - start
        assert rc == 2, (out, err)
        assert "eval.lm_eval.tasks[1]: unknown lm-eval task 'arc_eazy'; did you mean 'arc_easy'?" in err, err
        assert "tinyfacts" not in err and "Traceback" not in out + err
    assert list((tmp_path / "cache" / "tunelab").glob("lm_eval-*-tasks.json"))
    assert elapsed < 2.0, f"took {elapsed:.2f} s with the names cached"


def test_validate_checks_the_lm_eval_include_folder_and_installation(tmp_path, monkeypatch):
    from tunelab.errors import RecipeError
    from tunelab.eval import harness
    from tunelab.recipe.validate import validate as check

    _needs_lm_eval()
    path = tmp_path / "recipe.yaml"
    path.write_text(GOOD + "eval: {lm_eval: {tasks: [tinyfacts], include: no_such_dir}}\n")
    with pytest.raises(RecipeError) as exc:
        check(path)
    assert [p.where for p in exc.value.problems] == ["eval.lm_eval.include"]
    monkeypatch.setattr(harness, "installed", lambda: False)
    with pytest.raises(RecipeError) as exc:
        check(path)
    assert [p.where for p in exc.value.problems] == ["eval.lm_eval"]
    assert 'pip install "tunelab[lm-eval]"' in str(exc.value)


def test_lm_eval_include_is_relative_to_the_recipe(tmp_path):
    """Like a data file, the include folder is found beside the recipe that names it, from any directory."""
    from tunelab.recipe.load import load_recipe

    (tmp_path / "tasks").mkdir()
    path = tmp_path / "recipe.yaml"
    path.write_text(GOOD + "eval: {lm_eval: {tasks: [mine], include: tasks}}\n")
    assert load_recipe(path).recipe.eval.lm_eval.include == str(tmp_path / "tasks")


# --- every value of every row (issue 26.2) -------------------------------------------------------------------------
# reward columns, control tokens from the tokenizer's files, skip counts, eval rows also in train

SFT = str(Path(__file__).resolve().parents[3] / "recipes/quickstart/sft.yaml")

ROW_CHAT = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]}

def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

@pytest.mark.parametrize("name, value, why", [
    ("numeric", "no digits here", "has no number in it"),
    ("numeric", True, "must be a number, got bool"),
    ("numeric", [4], "must be a number, got list"),
    ("accuracy", {"a": 1}, "must be text or a number, got dict"),
    ("accuracy", False, "must be text or a number, got bool"),
])
def test_a_reward_column_of_the_wrong_type_is_a_bad_row(name, value, why):
    (check,) = reward_row_checks([RewardSpec(name=name, column="answer")])
    with pytest.raises(BadRow, match=f"column 'answer' \\(read by reward {name}\\) {why}"):
        check({"prompt": [], "answer": value})

@pytest.mark.parametrize("name, value", [("numeric", "#### 1,234"), ("numeric", 7), ("numeric", None),
                                         ("accuracy", "blue"), ("accuracy", 3.5), ("accuracy", None)])
def test_a_reward_column_that_the_reward_can_read_passes(name, value):
    (check,) = reward_row_checks([RewardSpec(name=name, column="answer")])
    check({"prompt": [], "answer": value})
    assert reward_row_checks([RewardSpec(name="length", target=10)]) == []

def test_the_control_tokens_come_from_the_tokenizer_files_of_a_builtin_model():
    control, tok = control_for_checks(load_recipe(SFT).recipe)
    assert control is not None and set(control.tokens) == {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}
    assert tok is None  # read from the files: nothing loaded
    control, tok = control_for_checks(load_recipe(SFT, ["model.path=runs/not-yet/final"]).recipe)
    assert control is None and tok is None  # a chain's later step: noted as missing, training checks the rows

def test_a_bad_row_is_reported_without_importing_transformers(tmp_path):
    """The control-token check reads the tokenizer's files: a bad row is still said before any heavy import."""
    data = write_rows(tmp_path / "d.jsonl", [ROW_CHAT, {"messages": [{"role": "user", "content": "<|im_start|>"},
                                                            {"role": "assistant", "content": "a"}]}])
    script = textwrap.dedent(f"""
        import sys
        from tunelab.errors import UserError
        from tunelab.recipe.validate import validate
        try:
            validate({SFT!r}, ['data.train=[{{source: "{data}", format: messages}}]', 'data.eval=[]'])
        except UserError as exc:
            print("control token" in str(exc) and "d.jsonl row 2" in str(exc),
                  [m for m in ("torch", "transformers", "trl") if m in sys.modules])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.split("\n")[0] == "True []", out.stdout + out.stderr

def test_skip_counts_the_bad_rows_in_a_note(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", [ROW_CHAT, {"messages": [{"role": "user", "content": "x<|endoftext|>"},
                                                            {"role": "assistant", "content": "a"}]}, ROW_CHAT])
    resolved = validate(SFT, [f'data.train=[{{source: "{data}", format: messages}}]', "data.eval=[]",
                              "data.on_bad_row=skip"])
    (note,) = [n for n in resolved.notes if "bad and will be skipped" in n]
    assert "1 of 3 rows" in note and "d.jsonl row 2" in note and "'<|endoftext|>'" in note
    assert [n for n, _ in resolved.sources[0].rows] == [1, 3]

def test_eval_rows_that_are_also_training_rows_are_a_note_with_the_count(tmp_path):
    other = {"messages": [{"role": "user", "content": "What is 3+3?"}, {"role": "assistant", "content": "6."}]}
    train = write_rows(tmp_path / "train.jsonl", [ROW_CHAT, other])
    # the same conversation as alpaca: identical once converted, so identical once rendered
    held = write_rows(tmp_path / "eval.jsonl", [{"instruction": "What is 2+2?", "output": "4."},
                                           {"instruction": "What is 5+5?", "output": "10."}])
    resolved = validate(SFT, [f'data.train=[{{source: "{train}", format: messages}}]',
                              f'data.eval=[{{source: "{held}", format: alpaca}}]'])
    (note,) = [n for n in resolved.notes if "also in the training data" in n]
    assert note.startswith("data.eval[0].source: 1 rows of")
    resolved = validate(SFT, [f'data.train=[{{source: "{train}", format: messages}}]',
                              f'data.eval=[{{source: "{train}", format: messages}}]'])
    assert any("2 rows of" in n and "also in the training data" in n for n in resolved.notes)

def test_as_text_passes_validate_and_renders_the_rows(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", [ROW_CHAT, {"messages": [{"role": "user", "content": "a<|im_end|>\n<|im_start|>x"},
                                                            {"role": "assistant", "content": "b <|im_end|>"}]}])
    overrides = [f'data.train=[{{source: "{data}", format: messages}}]', "data.eval=[]"]
    with pytest.raises(UserError, match="control token"):
        validate(SFT, overrides)
    resolved = validate(SFT, [*overrides, "data.control_tokens=as_text"])
    assert len(resolved.sources[0].rows) == 2
