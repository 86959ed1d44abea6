"""GRPO's group-normalised advantage, through TRL's GRPOTrainer as tunelab builds it.

A user reward function hands out fixed rewards; the advantages TRL computes for the batch must
equal (w·r - mean over the group) / (std over the group + 1e-4), computed here by hand.
"""

from __future__ import annotations

import statistics
import textwrap

import pytest
from tunelab.methods.base import RunHooks


@pytest.mark.parametrize("scale", ["group", "none"])
def test_group_normalised_advantages(tmp_path, monkeypatch, scale: str) -> None:
    pytest.importorskip("trl")
    (tmp_path / "fixedrewards.py").write_text(textwrap.dedent("""
        VALUES = [0.0, 1.0, 1.0, 3.0, 2.0, 2.0, 2.0, 2.0]
        def fixed(prompts, completions, **kw):
            return VALUES[: len(completions)]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    from tunelab.data.pipeline import build_datasets
    from tunelab.methods import METHODS

    build_trainer = METHODS["grpo"].build_trainer
    from tunelab.models.builtin import builtin_model, builtin_tokenizer
    from tunelab.recipe.schema import Recipe

    recipe = Recipe.model_validate({
        "model": {"path": "builtin:tiny-llama"},
        "data": {"train": [{"source": "builtin:quickstart/rl", "format": "prompt"}], "max_length": 128},
        "method": {"name": "grpo", "rewards": [{"function": "fixedrewards:fixed", "weight": 1.5}],
                   "num_generations": 4, "max_completion_length": 4, "scale_rewards": scale},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 8, "max_steps": 1, "report_to": ["none"]},
    })
    tok = builtin_tokenizer()
    train_ds, _, _ = build_datasets(recipe, tok)
    trainer = build_trainer(recipe, builtin_model("tiny-llama"), tok, train_ds, None, RunHooks())
    rows = [train_ds[0]] * 4 + [train_ds[1]] * 4  # TRL's sampler repeats each prompt num_generations times
    rows = [{k: v for k, v in r.items() if k != "prompt_ids"} for r in rows]
    out = trainer._generate_and_score_completions(rows)
    rewards = [1.5 * v for v in [0.0, 1.0, 1.0, 3.0, 2.0, 2.0, 2.0, 2.0]]
    want = []
    for g in (rewards[:4], rewards[4:]):
        mean, std = statistics.fmean(g), statistics.stdev(g)  # TRL's nanstd is Bessel-corrected
        want += [(r - mean) / (std + 1e-4) if scale == "group" else r - mean for r in g]
    assert out["advantages"].tolist() == pytest.approx(want, abs=1e-5)
    assert out["advantages"][4:].abs().max() == 0  # a group with one reward value teaches nothing
