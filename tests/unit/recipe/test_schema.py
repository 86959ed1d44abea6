"""The recipe schema's own checks (recipe/schema.py)."""


def test_an_unknown_chat_template_name_is_a_recipe_error_with_the_registry(tmp_path, run_cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {path: 'builtin:tiny-llama', chat_template: qwen-3}\n"
                      "data: {train: [{source: 'builtin:quickstart/sft'}]}\nmethod: {name: sft}\n")
    code, out, err = run_cli("validate", recipe)
    assert code == 2
    assert "model.chat_template" in err and "did you mean 'qwen3'" in err and "deepseek-r1" in err
