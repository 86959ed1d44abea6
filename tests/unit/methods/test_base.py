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
    assert rc == 2 and "method.trl.max_length: is decided by the recipe's data.max_length" in err


# ---- no silent overrides: every TRL field the recipe decides is owned, derived from one table ------------------

TRL_RECIPES = {"sft": "recipes/quickstart/sft.yaml", "reward": "recipes/quickstart/reward.yaml",
               "dpo": "recipes/quickstart/dpo.yaml", "grpo": "recipes/quickstart/grpo.yaml"}

# recipe key -> a value different from every quickstart recipe's (distributed: is checked by its own test below)
PERTURB = {
    "train.output_dir": "runs/elsewhere", "train.epochs": 3.5, "train.max_steps": 7, "train.learning_rate": 0.0123,
    "train.lr_scheduler": "constant_with_warmup", "train.warmup_ratio": 0.25, "train.weight_decay": 0.3,
    "train.max_grad_norm": 0.7, "train.optim": "sgd", "train.batch_size": 16, "train.eval_batch_size": 3,
    "train.grad_accum": 4, "train.seed": 1234, "train.logging_steps": 3, "train.save_steps": 11,
    "train.save_total_limit": 5, "train.report_to": "[none]", "train.num_workers": 1,
    "model.gradient_checkpointing": True, "data.max_length": 96,
}


# GRPOConfig knobs of their own whose TRL default follows the batch (they add to the recipe, override nothing):
# generation_batch_size = per-device batch x grad_accum x processes unless set, steps_per_generation = grad_accum
TRL_DEFAULTS_FROM_THE_BATCH = {"generation_batch_size", "steps_per_generation"}


def _trl_kwargs(method, recipe) -> dict:
    """The config the trainer is built with, as an object's fields (the way trl_problems builds it)."""
    import dataclasses

    config = method.trl_config(recipe, report_to="none", deepspeed=None, fsdp=None, fsdp_config=None,
                               accelerator_config=None)
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


@pytest.mark.parametrize("name", list(TRL_RECIPES))
def test_every_field_a_recipe_key_changes_is_owned_by_that_key(name):
    """Change one recipe key at a time and diff the TRL config *object* TRL builds: every field that moves must be
    owned, by that key. Found independently of the table (the config objects), so a field tunelab sets outside
    the table, or a table entry naming the wrong key, fails here."""
    import json

    from tunelab.methods import method_of
    from tunelab.methods.common import Owned
    from tunelab.recipe.load import load_recipe

    base_recipe = load_recipe(TRL_RECIPES[name], ["model.path=builtin:tiny-llama"]).recipe
    method = method_of(base_recipe.method)
    base = _trl_kwargs(method, base_recipe)
    settings = method.trl_settings(base_recipe)
    checked = 0
    for key, value in PERTURB.items():
        if name == "grpo" and key in ("train.batch_size", "train.grad_accum"):
            value = 16 if key == "train.batch_size" else 2  # a multiple of the group size
        sets = ["model.path=builtin:tiny-llama", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
        recipe = load_recipe(TRL_RECIPES[name], sets).recipe
        moved = {f for f, v in _trl_kwargs(method, recipe).items() if v != base[f]} - TRL_DEFAULTS_FROM_THE_BATCH
        for field in moved:
            owned = settings.get(field)
            assert isinstance(owned, Owned) and key in (owned.key, *owned.follows), (name, key, field, owned)
        checked += len(moved)
    assert checked >= 15, checked  # the perturbations did reach the config


@pytest.mark.parametrize("name", list(TRL_RECIPES))
def test_method_trl_setting_an_owned_field_is_an_error_naming_the_recipe_key(name):
    from tunelab.methods import method_of
    from tunelab.methods.common import Owned
    from tunelab.recipe.load import load_recipe

    recipe = load_recipe(TRL_RECIPES[name], ["model.path=builtin:tiny-llama"]).recipe
    method = method_of(recipe.method)
    owned = {f: s for f, s in method.trl_settings(recipe).items() if isinstance(s, Owned)}
    assert {"lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim", "save_strategy",
            "deepspeed", "fsdp", "gradient_accumulation_steps"} <= set(owned)
    for field, setting in owned.items():
        recipe.method.trl = {field: "x"}
        problems = method.trl_problems(recipe)
        assert [p.where for p in problems] == [f"method.trl.{field}"], field
        text = str(problems[0])
        if setting.key.startswith("tunelab:"):
            assert "is fixed by tunelab" in text, text
        else:
            assert f"set {setting.key} instead" in text and f"decided by the recipe's {setting.key}" in text, text


def test_method_trl_override_is_refused_through_the_cli(tmp_path, run_cli):
    path = tmp_path / "recipe.yaml"
    path.write_text(GOOD.replace("{name: sft}", "{name: sft, trl: {lr_scheduler_type: linear}}"))
    rc, _, err = run_cli("validate", path)
    assert rc == 2, err
    assert "method.trl.lr_scheduler_type: is decided by the recipe's train.lr_scheduler" in err
    assert "set train.lr_scheduler instead" in err


def test_one_trl_field_declared_in_trl_block():
    """`trl` is declared once, in TRLBlock; each TRL method's block inherits it."""
    from tunelab.methods import METHODS
    from tunelab.methods.base import TRLBlock

    trl_blocks = [m.config for m in METHODS.values() if issubclass(m.config, TRLBlock)]
    assert len(trl_blocks) >= 4
    for block in trl_blocks:
        declared = [c for c in block.__mro__ if "trl" in c.__dict__.get("__annotations__", {})]
        assert declared == [TRLBlock], (block.__name__, declared)


# ---- the trainer interface: train.py asks a protocol, never probes ---------------------------------------------


def test_train_py_never_probes_a_trainer():
    """No hasattr/getattr on the trainer or its accelerator in train.py: what it asks is ``MethodTrainer``."""
    import ast
    from pathlib import Path

    import tunelab.train

    tree = ast.parse(Path(tunelab.train.__file__).read_text())
    probes = [ast.unparse(node) for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
              and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in ("trainer", "accelerator")]
    assert probes == []


def test_every_trainer_class_meets_the_protocol():
    """transformers' Trainer (what every TRL trainer is) and our PPOTrainer have what MethodTrainer asks."""
    import inspect

    from transformers import Trainer

    from tunelab.methods.base import MethodTrainer
    from tunelab.methods.ppo.trainer import PPOTrainer

    wanted = [n for n in ("train", "save_model", "is_world_process_zero") if callable(getattr(MethodTrainer, n))]
    for cls in (Trainer, PPOTrainer):
        for name in wanted:
            params = list(inspect.signature(getattr(cls, name)).parameters)
            proto = list(inspect.signature(getattr(MethodTrainer, name)).parameters)
            assert params[: len(proto)] == proto, (cls.__name__, name, params)
