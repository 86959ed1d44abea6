"""The method contract (methods/base.py): strategies a method refuses, TRL config fields checked by name."""

import pytest

from tunelab.errors import UserError


def test_ppo_refuses_zero3_before_training():
    from tunelab.recipe.validate import validate

    with pytest.raises(UserError) as exc:
        validate("recipes/quickstart/ppo.yaml", ["distributed.strategy=zero3"])
    assert "distributed.strategy" in exc.value.render() and "method ppo does not run under zero3" in exc.value.render()


GOOD = """\
model: {path: "builtin:tiny-llama"}
data:
  train: [{source: "builtin:quickstart/sft", format: messages}]
  max_length: 256
method: {name: sft}
train: {output_dir: runs/x, learning_rate: 1.0e-3}
"""


def test_trl_config_errors_name_the_key(tmp_path, run_cli):
    path = tmp_path / "recipe.yaml"
    path.write_text(GOOD.replace("{name: sft}", "{name: sft, trl: {dataset_text_feld: body}}"))
    rc, _, err = run_cli("validate", path)
    assert rc == 2 and "method.trl.dataset_text_feld: unknown TRL config field" in err
    assert "did you mean 'dataset_text_field'?" in err
    path.write_text(GOOD.replace("{name: sft}", "{name: sft, trl: {max_length: 64}}"))
    rc, _, err = run_cli("validate", path)
    assert rc == 2 and "method.trl.max_length: is set by tunelab" in err
