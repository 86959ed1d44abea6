"""The PPO trainer's four models: PEFT reference without a copy, critic from the reward model, one step."""

import torch
from datasets import Dataset

from tunelab.models.builtin import builtin_model, builtin_tokenizer
from tunelab.models.peft import apply_peft
from tunelab.recipe.load import load_recipe
from tunelab.methods.base import RunHooks

PROMPTS = ["What colour is a frost bell?", "What colour is a sun drop?", "Name a colour.", "Say hi."]


def _reward_model(path):
    tok = builtin_tokenizer()
    rm = builtin_model("tiny-llama", head="score")
    with torch.no_grad():  # a score head that is not the seeded one, so "equals the reward model" means something
        rm.score.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(path)
    tok.save_pretrained(path)
    return rm


def _trainer(tmp_path):
    from tunelab.methods.ppo.trainer import PPOTrainer

    rm_dir = tmp_path / "rm" / "final"
    rm = _reward_model(rm_dir)
    recipe = load_recipe("recipes/quickstart/ppo.yaml", [
        "model.path=builtin:tiny-llama", f"train.output_dir={tmp_path / 'run'}", "train.report_to=[none]",
        "peft={method: lora, r: 4, alpha: 8, target_modules: all-linear}",
        f"method.rewards=[{{model: {rm_dir}}}, {{name: length, target: 5, weight: 0.5}}]",
        "method.critic=reward_model", "method.max_completion_length=6", "method.ppo_epochs=1",
        "method.missing_eos_penalty=1.5", "method.save_critic=true",
        "train.batch_size=4", "train.max_steps=1", "train.learning_rate=1.0e-2"]).recipe
    tok = builtin_tokenizer()
    policy = apply_peft(builtin_model("tiny-llama"), recipe.peft, tok)
    rows = [{"prompt": [{"role": "user", "content": p}],
             "prompt_ids": tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]} for p in PROMPTS]
    ds = Dataset.from_list(rows)
    return PPOTrainer(recipe, policy, tok, ds, RunHooks()), rm, tok


def test_ppo_four_models_under_peft(tmp_path):
    trainer, rm, tok = _trainer(tmp_path)
    model = trainer.unwrapped

    # the reference is the policy with its adapters disabled: no copy of the weights
    assert trainer.ref is None
    # the critic starts as the reward model (its LoRA B is zero): V at the last token = the RM's score
    ids = tok("What colour is a frost bell? It is white.", return_tensors="pt")["input_ids"]
    attn = torch.ones_like(ids)
    pos = torch.arange(ids.size(1))[None]
    with torch.no_grad():
        value_last = model.critic(ids, attn, pos)[0, -1].item()
        rm_score = rm(input_ids=ids, attention_mask=attn).logits[0, 0].item()
    assert value_last == rm_score != 0.0
    # two reward kinds, the model one on the trainer's device
    assert [f.label for f in trainer.rewards] == ["rm:rm", "length"]

    base_before = {n: p.detach().clone() for n, p in model.policy.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.policy.named_parameters() if "lora_B" in n}
    critic_lora = {n: p.detach().clone() for n, p in model.critic.named_parameters() if "lora_B" in n}
    stats = trainer.step(trainer.batch_rows(0))

    for key in ("reward", "kl", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl",
                "explained_variance", "reward/rm:rm", "reward/length", "kl_coef"):
        assert key in stats and stats[key] == stats[key], key  # present and not NaN
    assert stats["kl"] == 0.0  # the rollout is scored before any update: π = π_ref
    # the score: weighted rewards, minus the penalty for each completion cut at max_completion_length
    assert stats["eos_fraction"] < 1  # 6 tokens from a random model: most never end
    expected = stats["reward/rm:rm"] + 0.5 * stats["reward/length"] - 1.5 * (1 - stats["eos_fraction"])
    assert abs(stats["reward"] - expected) < 1e-5
    for n, p in model.policy.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n  # the base (= the reference) never moves
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.policy.named_parameters() if "lora_B" in n)
    assert any(not torch.equal(p, critic_lora[n]) for n, p in model.critic.named_parameters() if "lora_B" in n)

    # after the update the reference is still exactly the untouched base model
    with torch.no_grad(), model.policy.disable_adapter():
        ref_logits = model.policy(input_ids=ids).logits
    base_logits = builtin_model("tiny-llama")(input_ids=ids).logits
    torch.testing.assert_close(ref_logits, base_logits.detach(), rtol=0, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(model.policy(input_ids=ids).logits, base_logits, atol=1e-4)  # the policy moved

    # final/: the policy's adapter, and with save_critic the critic's (a sequence-classification adapter)
    import json

    trainer.save_model(str(tmp_path / "final"))
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert json.loads((tmp_path / "final" / "critic" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
