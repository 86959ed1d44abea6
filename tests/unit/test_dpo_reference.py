"""DPO's reference model: PEFT keeps one copy of the base and scores the reference with adapters disabled."""

import torch
from datasets import Dataset
from trl.trainer.dpo_trainer import DataCollatorForPreference

from tunelab.methods import METHODS

build_trainer = METHODS["dpo"].build_trainer
from tunelab.models.builtin import builtin_model, builtin_tokenizer
from tunelab.models.peft import apply_peft
from tunelab.recipe.load import load_recipe

PAIRS = {"prompt_ids": [[5, 6, 7, 8], [9, 10]], "chosen_ids": [[11, 12, 13], [14]], "rejected_ids": [[15], [16, 17]]}


def _recipe(tmp_path, *extra):
    return load_recipe("recipes/quickstart/dpo.yaml", [
        "model.path=builtin:tiny-llama", f"train.output_dir={tmp_path}", "train.report_to=[none]", "data.eval=[]",
        *extra]).recipe


def _summed_logps(model, batch):
    """Σ log p(response tokens) of each row, computed directly from the logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (logp * batch["completion_mask"][:, 1:]).sum(1)


def test_peft_dpo_keeps_one_copy_and_reference_is_base(tmp_path):
    recipe = _recipe(tmp_path, "peft={method: lora, r: 4, alpha: 8, target_modules: all-linear}")
    tok = builtin_tokenizer()
    model = apply_peft(builtin_model("tiny-llama"), recipe.peft, tok)
    trainer = build_trainer(recipe, model, tok, Dataset.from_dict(PAIRS), None, [])

    # no reference model and no reference adapter: the reference is the base with adapters disabled
    assert trainer.ref_model is None
    assert list(trainer.model.peft_config) == ["default"]
    base_numel = sum(p.numel() for p in builtin_model("tiny-llama").parameters())
    held = {p.data_ptr(): (n, p.numel()) for n, p in trainer.model.named_parameters()}
    lora = sum(k for n, k in held.values() if "lora_" in n)
    assert sum(k for _, k in held.values()) - lora == base_numel  # one copy of the base weights

    # make the policy differ from the base, then score the reference
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    batch = DataCollatorForPreference(pad_token_id=0)([{k: PAIRS[k][i] for k in PAIRS} for i in range(2)])
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    expected = _summed_logps(builtin_model("tiny-llama").eval(), batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]).double(), expected, atol=1e-4, rtol=1e-5)
    policy = _summed_logps(trainer.model.eval(), batch)
    assert not torch.allclose(policy, expected, atol=1e-2)  # guard: the adapters do change the policy


def test_full_finetune_reference_is_a_frozen_copy_of_the_start(tmp_path):
    recipe = _recipe(tmp_path)
    model = builtin_model("tiny-llama")
    trainer = build_trainer(recipe, model, builtin_tokenizer(), Dataset.from_dict(PAIRS), None, [])
    ref = trainer.ref_model
    assert ref is not None and ref is not trainer.model
    assert all(not p.requires_grad for p in ref.parameters())
    for (n, a), (_, b) in zip(trainer.model.named_parameters(), ref.named_parameters()):
        assert a.data_ptr() != b.data_ptr() and torch.equal(a, b), n


def test_precompute_and_explicit_reference(tmp_path):
    ref_dir = tmp_path / "ref"
    builtin_model("tiny-qwen2").save_pretrained(ref_dir)
    recipe = _recipe(tmp_path / "a", f"method.reference={ref_dir}")
    trainer = build_trainer(recipe, builtin_model("tiny-llama"), builtin_tokenizer(), Dataset.from_dict(PAIRS), None, [])
    assert type(trainer.ref_model).__name__ == "Qwen2ForCausalLM"

    recipe = _recipe(tmp_path / "b", "method.precompute_ref_log_probs=true")
    trainer = build_trainer(recipe, builtin_model("tiny-llama"), builtin_tokenizer(), Dataset.from_dict(PAIRS), None, [])
    assert trainer.ref_model is None
    batch = DataCollatorForPreference(pad_token_id=0)([{k: PAIRS[k][i] for k in PAIRS} for i in range(2)])
    expected = _summed_logps(builtin_model("tiny-llama").eval(), batch)
    got = torch.tensor(list(trainer.train_dataset["ref_chosen_logps"]) + list(trainer.train_dataset["ref_rejected_logps"]))
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-5)
