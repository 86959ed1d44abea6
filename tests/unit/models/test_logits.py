"""Scored logits (models/logits.py): the LM head at the scored positions only equals the full logits there."""

import pytest
import torch

from tunelab.models.builtin import builtin_model


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))


@pytest.mark.parametrize("wrap", ["plain", "lora"])
def test_scored_logits_equal_full_logits_at_those_positions(wrap):
    from tunelab.models.logits import scored_logits

    torch.manual_seed(0)
    model = builtin_model("tiny-llama")
    model = _lora(model) if wrap == "lora" else model
    if wrap == "lora":  # non-zero adapters, so the comparison covers the LoRA path
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.1)
    ids = torch.randint(3, 1400, (2, 12))
    pos = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])  # row 0 packs two examples
    inputs = {"input_ids": ids, "position_ids": pos, "use_cache": False}
    rows, cols = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([1, 9, 0, 4, 11])
    full = model(**inputs).logits
    torch.testing.assert_close(scored_logits(model, inputs, rows, cols), full[rows, cols], atol=1e-5, rtol=1e-5)


def test_scored_logits_fall_back_where_the_head_output_is_post_processed():
    from tunelab.models.logits import head_and_decoder

    model = builtin_model("tiny-llama")
    assert head_and_decoder(model) is not None
    model.config.final_logit_softcapping = 30.0
    assert head_and_decoder(model) is None
