"""The README's preference chain on CPU: SFT -> reward model, SFT -> DPO, SFT -> IPO, on bundled pairs."""

import json

import pytest


def _train(run_cli, recipe, sft_dir, out, *extra):
    rc, stdout, stderr = run_cli("train", f"recipes/quickstart/{recipe}.yaml", "--set", f"model.path={sft_dir}/final",
                                 "--set", f"train.output_dir={out}", *extra)
    assert rc == 0, stderr[-3000:]
    return json.loads((out / "summary.json").read_text()), stdout


@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs(run_cli, quickstart_sft, tmp_path):
    sft_dir, rc, _, err = quickstart_sft
    assert rc == 0, err[-2000:]
    out = tmp_path / "reward"
    summary, stdout = _train(run_cli, "reward", sft_dir, out)
    # measured 0.60 -> 0.84 and (after issue 15's SFT levers changed the SFT model's rounding) 0.565 -> 0.765:
    # the figure moves a few points with the SFT model's last digits, the gain over the new head does not
    before = summary["eval_before"]["accuracy"]
    assert summary["pairwise_accuracy"] >= 0.72 and summary["pairwise_accuracy"] >= before + 0.15, summary
    assert summary["mean_margin"] > 0
    assert "held-out pairwise accuracy:" in stdout

    # the saved model is a plain transformers reward model that scores text
    rc, stdout, stderr = run_cli("eval", str(out), "--task", "reward", "--data", "builtin:quickstart/preference_eval")
    assert rc == 0, stderr[-2000:]
    assert f"pairwise accuracy: {summary['pairwise_accuracy']:.4f}" in stdout
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    chat = [{"role": "user", "content": "What colour is a frost bell?"}]
    good = tok.apply_chat_template(chat + [{"role": "assistant", "content": "A frost bell is white."}],
                                   return_tensors="pt", return_dict=True)
    bad = tok.apply_chat_template(chat + [{"role": "assistant", "content": "I don't know."}],
                                  return_tensors="pt", return_dict=True)
    assert model(**good).logits[0, 0] > model(**bad).logits[0, 0]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["dpo", "ipo"])
def test_preference_optimisation_moves_the_policy(run_cli, quickstart_sft, tmp_path, recipe):
    sft_dir, rc, _, err = quickstart_sft
    assert rc == 0, err[-2000:]
    # one epoch of the recipe's two (half the time): the policy has moved by then
    summary, stdout = _train(run_cli, recipe, sft_dir, tmp_path / recipe, "--set", "train.epochs=1")
    assert summary["implicit_reward_margin"] > 0, summary
    assert summary["mean_logratio_after"] > summary["mean_logratio_before"], summary
    assert "held-out implicit reward margin" in stdout and "log π(chosen) - log π(rejected)" in stdout
    metrics = [json.loads(line) for line in (tmp_path / recipe / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in metrics if "rewards/margins" in m]
    assert logged and all(k in logged[-1] for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies"))


@pytest.mark.parametrize("recipe, peft", [
    ("reward", "{method: lora, r: 4, alpha: 8, target_modules: all-linear}"),
    ("reward", "{method: qlora, r: 4, alpha: 8, target_modules: all-linear, quantization: {compute_dtype: float32}}"),
    ("dpo", "{method: lora, r: 4, alpha: 8, target_modules: all-linear}"),
    ("dpo", "{method: qlora, r: 4, alpha: 8, target_modules: all-linear, quantization: {compute_dtype: float32}}"),
])
def test_peft_preference_runs_train(run_cli, tmp_path, recipe, peft):
    out = tmp_path / "run"
    rc, stdout, stderr = run_cli("train", f"recipes/quickstart/{recipe}.yaml", "--set", "model.path=builtin:tiny-llama",
                                 "--set", f"peft={peft}", "--set", "train.max_steps=4", "--set", "data.eval.0.samples=16",
                                 "--set", f"train.output_dir={out}")
    assert rc == 0, stderr[-3000:]
    assert (out / "final" / "adapter_config.json").is_file()
    if recipe == "reward":
        cfg = json.loads((out / "final" / "adapter_config.json").read_text())
        assert cfg["task_type"] == "SEQ_CLS" and "score" in (cfg.get("modules_to_save") or [])
        rc, stdout, stderr = run_cli("eval", str(out), "--task", "reward", "--data",
                                     "builtin:quickstart/preference_eval", "--limit", "16")
        assert rc == 0 and "pairwise accuracy:" in stdout, stderr[-2000:]
