"""The mla patch's calibration tokens (patches/mla/calibration.py)."""

import json

import pytest

from tunelab.data.sources import BUILTIN_DATA
from tunelab.errors import UserError
from tunelab.models.builtin import builtin_tokenizer


def test_calibration_tokens_render_conversations_through_the_chat_template():
    from tunelab.patches.mla.block import MlaPatch
    from tunelab.patches.mla.calibration import calibration_token_ids

    tok = builtin_tokenizer()
    spec = MlaPatch(name="mla", kv_lora_rank=8, rope_dim=4, partial_rope="2-norm",
                    calibration_data="builtin:quickstart/sft", calibration_samples=3, calibration_length=50)
    rows = calibration_token_ids(spec, tok)
    assert [len(r) for r in rows] == [50, 50, 50]
    first = json.loads((BUILTIN_DATA / "quickstart/sft.jsonl").read_text().splitlines()[0])
    rendered = tok.apply_chat_template(first["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert rows[0] == list(rendered[:50])
    text = spec.model_copy(update={"calibration_data": "builtin:quickstart/text"})
    first_text = json.loads((BUILTIN_DATA / "quickstart/text.jsonl").read_text().splitlines()[0])["text"]
    assert calibration_token_ids(text, tok)[0] == tok(first_text, add_special_tokens=False)["input_ids"][:50]
    with pytest.raises(UserError, match="calibration_samples x calibration_length"):
        calibration_token_ids(spec.model_copy(update={"calibration_samples": 10_000}), tok)
