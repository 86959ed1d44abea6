"""``tunelab plan``'s data preview (plan/data.py): the loss masks it prints are the pipeline's, for every format."""

from __future__ import annotations

from pathlib import Path

from tunelab.recipe.load import load_recipe

REPO = Path(__file__).resolve().parents[3]


def test_plan_shows_the_masks_of_multi_turn_rows_pairs_and_prompts():
    """The loss mask `tunelab plan` prints is the pipeline's, for every format: a multi-turn row masks each
    assistant turn through <|im_end|>; a pair masks each response; a prompt has no loss tokens."""
    from tunelab.models.builtin import builtin_tokenizer
    from tunelab.plan import render_examples

    tok = builtin_tokenizer()
    sft = render_examples(load_recipe(REPO / "recipes/quickstart/sft.yaml").recipe, tok)
    multi = [text for label, text in sft if "assistant turns" in label]
    assert multi and multi[0].count("[[") >= 2 and multi[0].count("<|im_end|>]]") == multi[0].count("[[")
    assert "<|im_start|>user" not in "".join(part.split("]]")[0] for part in multi[0].split("[[")[1:])
    pairs = render_examples(load_recipe(REPO / "recipes/quickstart/dpo.yaml", ["model.path=builtin:tiny-llama"]).recipe,
                            tok)
    assert [label.split(", ")[-1] for label, _ in pairs] == ["prompt + chosen", "prompt + rejected"]
    assert all(text.count("[[") == 1 and text.endswith("<|im_end|>]]") for _, text in pairs)
    prompts = render_examples(load_recipe(REPO / "recipes/quickstart/grpo.yaml", ["model.path=builtin:tiny-llama"]).recipe,
                              tok)
    assert "the policy continues" in prompts[0][0] and "[[" not in prompts[0][1]
    assert prompts[0][1].endswith("<|im_start|>assistant\n")
