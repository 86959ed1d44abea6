"""The mla patch block's checks against the model's config (patches/mla/block.py), at validate."""

import json

import pytest


GOOD = """\
model: {path: "builtin:tiny-llama"}
data:
  train: [{source: "builtin:quickstart/sft", format: messages}]
  max_length: 256
method: {name: sft}
train: {output_dir: runs/x, learning_rate: 1.0e-3}
"""


# Checks of a patch against the model's config run after the config is read (transformers is
# imported for that), so they are tested in this process rather than in the fast cases above.
MODEL_CASES = {  # id -> (model.path: builtin name or a config.json to write, patch fields, substrings)
    "mla-rank-too-large": ("builtin:tiny-llama", "kv_lora_rank: 129, rope_dim: 8",
                           [("patches[0].kv_lora_rank: 129 is larger than 2 x num_key_value_heads x head_dim = "
                             "2 x 2 x 32 = 128"), "use 1 to 128"]),
    "mla-rope-dim-over-head-dim": ("builtin:tiny-llama", "kv_lora_rank: 32, rope_dim: 34",
                                   ["patches[0].rope_dim: 34 is larger than the model's head_dim 32"]),
    "mla-unsupported-model": ({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2},
                              "kv_lora_rank: 8, rope_dim: 4",
                              [("patches[0]: model.path is a 'gpt2' model; MLA conversion supports llama, "
                                "qwen2, mistral")]),
    "mla-already-converted": ("mla", "kv_lora_rank: 8, rope_dim: 4",
                              ["patches[0]: model.path is already converted to MLA", "drop the mla patch"]),
}


@pytest.mark.parametrize("case_id", sorted(MODEL_CASES))
def test_patch_checks_against_the_model_config(case_id, tmp_path):
    from tunelab.errors import RecipeError
    from tunelab.models.builtin import builtin_config
    from tunelab.recipe.validate import validate

    model, fields, expect = MODEL_CASES[case_id]
    if not isinstance(model, str) or model == "mla":
        config = builtin_config("tiny-llama").to_dict() | {"mla": {"kv_lora_rank": 32}} if model == "mla" else model
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "config.json").write_text(json.dumps(config))
        model = str(tmp_path / "model")
    path = tmp_path / "recipe.yaml"
    path.write_text(GOOD.replace("builtin:tiny-llama", model) + f"patches: [{{name: mla, {fields}}}]\n")
    with pytest.raises(RecipeError) as exc:
        validate(path)
    for s in expect:
        assert s in str(exc.value), f"{s!r} not in:\n{exc.value}"
