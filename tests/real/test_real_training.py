"""SmolLM2-135M-Instruct from its GGUF file: LoRA SFT, merge, plain transformers answers and stops;
DPO and GRPO run a few steps. Each run is a few steps only: these check that the chain works on a
real model (template, stop token, GGUF loading, saving), not how well it learns (docs/real-models.md)."""

from __future__ import annotations

import json

import pytest
import yaml

pytestmark = [pytest.mark.real, pytest.mark.slow]
FAST = ["--set", "train.report_to=[none]", "--set", "train.eval_before_train=false"]


def eos_ids(path) -> list[int]:
    eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    return [eos] if isinstance(eos, int) else list(eos)


def answer(model_dir, question: str) -> tuple[str, bool]:
    """Plain transformers, no tunelab: (greedy answer, whether it stopped by itself)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    x = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                return_tensors="pt", return_dict=True)
    out = model.generate(**x, max_new_tokens=40, do_sample=False)[0][x["input_ids"].shape[1]:]
    stopped = len(out) < 40 and int(out[-1]) in eos_ids(model_dir)
    return tok.decode(out, skip_special_tokens=True), stopped


@pytest.mark.parametrize("how", ["gguf-file", "builtin"])
def test_lora_sft_on_smollm2_merges_and_plain_transformers_answers(smollm2_gguf, tmp_path, run_cli, how):
    run, merged = tmp_path / "run", tmp_path / "merged"
    path = str(smollm2_gguf) if how == "gguf-file" else "builtin:smollm2-135m-instruct"
    code, out, err = run_cli("train", "recipes/real/sft-lora.yaml", "--set", f"model.path={path}", "--set",
                             f"train.output_dir={run}", "--set", "train.max_steps=2", *FAST)
    assert code == 0, (out + err)[-3000:]
    final = run / "final"
    assert (final / "adapter_model.safetensors").is_file() and not list(final.glob("*.gguf"))
    im_end = 2  # <|im_end|>: the end of every ChatML turn, and SmolLM2's eos
    assert im_end in eos_ids(final)
    lock = yaml.safe_load((run / "recipe.lock.yaml").read_text())
    assert lock["tunelab_lock"]["chat_template"]["name"] == "smollm2"
    card = (final / "README.md").read_text()
    assert "huggingface.co" not in card and "More Information Needed" not in card
    assert path in card and "builtin:quickstart/sft" in card and "tunelab merge" in card
    code, out, err = run_cli("merge", run, "-o", merged)
    assert code == 0, (out + err)[-3000:]
    assert (merged / "model.safetensors").is_file() and im_end in eos_ids(merged)
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    reply, stopped = answer(merged, "What is the capital of France?")
    assert "Paris" in reply and stopped, reply


def test_dpo_on_smollm2_runs_and_reports_margins(smollm2_gguf, tmp_path, run_cli):
    code, out, err = run_cli("train", "recipes/real/dpo-lora.yaml", "--set", f"train.output_dir={tmp_path / 'run'}",
                             "--set", "train.max_steps=2", "--set", "data.eval.0.samples=8", *FAST)
    assert code == 0, (out + err)[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_step"] == 2 and "implicit_reward_margin" in summary
    assert 2 in eos_ids(tmp_path / "run" / "final")


def test_grpo_on_smollm2_runs(smollm2_gguf, tmp_path, run_cli):
    code, out, err = run_cli("train", "recipes/real/grpo-lora.yaml", "--set", f"train.output_dir={tmp_path / 'run'}",
                             "--set", "train.max_steps=2", "--set", "method.eval_samples=1", "--set",
                             "data.eval.0.samples=4", *FAST)
    assert code == 0, (out + err)[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_step"] == 2
    assert 2 in eos_ids(tmp_path / "run" / "final")


def test_full_fine_tune_from_the_gguf_saves_plain_safetensors(smollm2_gguf, tmp_path, run_cli):
    """No adapter: final/ is a whole model in ordinary safetensors, without the loader's "quantized: GGUF" tag."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    code, out, err = run_cli("train", "recipes/real/sft-lora.yaml", "--set", "peft=null", "--set",
                             f"train.output_dir={run}", "--set", "train.max_steps=1", "--set", "train.batch_size=1",
                             "--set", "data.max_length=128", "--set", "data.eval.0.samples=4", *FAST)
    assert code == 0, (out + err)[-3000:]
    config = json.loads((run / "final" / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (run / "final" / "model.safetensors").is_file() and 2 in eos_ids(run / "final")
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert model.config.num_hidden_layers == 30 and not getattr(model, "is_quantized", False)
