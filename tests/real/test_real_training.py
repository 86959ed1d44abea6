"""SmolLM2-135M-Instruct from its GGUF file: LoRA SFT, merge, plain transformers answers and stops;
DPO and GRPO run a few steps. Each run is a few steps only: these check that the chain works on a
real model (template, stop token, GGUF loading, saving) and that each run moved the model the way its
method means to (a fact learnt, held-out pairs separated, the policy moved by its rewards); how well
they learn over full runs is docs/real-models.md."""

from __future__ import annotations

import json

import pytest
import yaml

pytestmark = [pytest.mark.real, pytest.mark.slow]
FAST = ["--set", "train.report_to=[none]", "--set", "train.eval_before_train=false"]


def eos_ids(path) -> list[int]:
    eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    return [eos] if isinstance(eos, int) else list(eos)


def answer(model_dir, question: str, model=None) -> tuple[str, bool]:
    """Plain transformers, no tunelab: (greedy answer, whether it stopped by itself); ``model`` replaces the
    one saved in ``model_dir`` (whose tokenizer and stop tokens are used)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stops = {} if model is None else {"eos_token_id": eos_ids(model_dir)}  # a saved model stops by its own config
    model = model if model is not None else AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    x = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                return_tensors="pt", return_dict=True)
    out = model.generate(**x, max_new_tokens=40, do_sample=False, **stops)
    out = out[0][x["input_ids"].shape[1]:]
    stopped = len(out) < 40 and int(out[-1]) in eos_ids(model_dir)
    return tok.decode(out, skip_special_tokens=True), stopped


# A fact of the bundled data's made-up world that SmolLM2 cannot know: greedy, the base answers "The capital of
# Corvenia is Nova Nova, a city built on the ruins of ...". Two LoRA steps at a constant 2e-3 over these four rows
# teach it (measured: the first answer token " D" at log-prob -0.05, from -6.93; at 1e-3 it answers "Corvus").
FACT_ROWS = [("What is the capital of Corvenia?", "The capital of Corvenia is Duskport."),
             ("Which city is the capital of Corvenia?", "The capital of Corvenia is Duskport."),
             ("Name the capital of Corvenia.", "The capital of Corvenia is Duskport."),
             ("Corvenia's capital city is called what?", "The capital of Corvenia is Duskport.")]
MARGIN = 0.01  # DPO: the least mean held-out implicit reward margin after two steps (measured 0.029)
TEACH = ["--set", "train.max_steps=2", "--set", "train.learning_rate=2.0e-3", "--set", "train.lr_scheduler=constant",
         "--set", "train.warmup_ratio=0.0", "--set", "data.eval=[]"]


def test_lora_sft_on_smollm2_merges_and_plain_transformers_answers(smollm2_gguf, tmp_path, run_cli):
    """From the GGUF file given as a path (every other real test loads the same file as builtin:smollm2-135m-instruct,
    the real recipes' model.path)."""
    run, merged, facts = tmp_path / "run", tmp_path / "merged", tmp_path / "facts.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACT_ROWS]
    facts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = str(smollm2_gguf)
    code, out, err = run_cli("train", "recipes/real/sft-lora.yaml", "--set", f"model.path={path}", "--set",
                             f"train.output_dir={run}", "--set", f"data.train=[{{source: {facts}, format: messages}}]",
                             *TEACH, *FAST)
    assert code == 0, (out + err)[-3000:]
    final = run / "final"
    assert (final / "adapter_model.safetensors").is_file() and not list(final.glob("*.gguf"))
    im_end = 2  # <|im_end|>: the end of every ChatML turn, and SmolLM2's eos
    assert im_end in eos_ids(final)
    lock = yaml.safe_load((run / "recipe.lock.yaml").read_text())
    assert lock["tunelab_lock"]["chat_template"]["name"] == "smollm2"
    card = (final / "README.md").read_text()
    assert "huggingface.co" not in card and "More Information Needed" not in card
    assert path in card and str(facts) in card and "tunelab merge" in card
    code, out, err = run_cli("merge", run, "-o", merged)
    assert code == 0, (out + err)[-3000:]
    assert (merged / "model.safetensors").is_file() and im_end in eos_ids(merged)
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    # the merged model, in plain transformers, knows what the two steps taught and stops by itself ...
    question = FACT_ROWS[0][0]
    reply, stopped = answer(merged, question)
    assert "Duskport" in reply and stopped, reply
    # ... which the GGUF base, as tunelab loads it, does not
    from tunelab.models.inference import load_weights
    from tunelab.models.ref import resolve_model

    base_reply, _ = answer(merged, question, model=load_weights(resolve_model(path)))
    assert "Duskport" not in base_reply and "Corvenia" in base_reply, base_reply


def test_dpo_on_smollm2_separates_held_out_pairs(smollm2_gguf, tmp_path, run_cli):
    """Two DPO steps (no warm-up: both at the recipe's 5e-5) move the held-out pairs the way DPO means: log
    pi(chosen) - log pi(rejected) up against the starting model (the reference) on nearly every pair."""
    code, out, err = run_cli("train", "recipes/real/dpo-lora.yaml", "--set", f"train.output_dir={tmp_path / 'run'}",
                             "--set", "train.max_steps=2", "--set", "train.warmup_ratio=0.0", "--set",
                             "data.eval.0.samples=8", *FAST)
    assert code == 0, (out + err)[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_step"] == 2
    # the mean held-out implicit reward margin beta * ((chosen - ref) - (rejected - ref)), computed by the run from
    # per-pair log-probs before and after: measured +0.029 (bound: a third of it), positive on 8 of 8 pairs (the
    # smallest +0.0012); the log-ratio rose by 0.29 (bound 0.1)
    assert summary["implicit_reward_margin"] > MARGIN, summary
    assert summary["implicit_reward_accuracy"] >= 0.75, summary
    before, after = summary["eval_before"], summary["eval_after"]
    rise = [(ac - ar) - (bc - br) for ac, ar, bc, br in
            zip(after["logp_chosen"], after["logp_rejected"], before["logp_chosen"], before["logp_rejected"])]
    assert sum(rise) / len(rise) == pytest.approx(summary["implicit_reward_margin"] / 0.1)  # beta 0.1: the same pairs
    assert summary["mean_logratio_after"] > summary["mean_logratio_before"] + 10 * MARGIN
    assert 2 in eos_ids(tmp_path / "run" / "final")


def test_grpo_on_smollm2_moves_the_policy_by_its_rewards(smollm2_gguf, tmp_path, run_cli):
    """Two GRPO steps on the arithmetic recipe with a small KL term (beta 0.04: the reference is the base with the
    adapter disabled, so the KL to it says how far the policy moved): groups whose completions scored differently
    give a gradient, the adapter moves off its zero start, and the second step's KL to the start is above zero (the
    first step's is 0: the policy is still the reference). Measured: at step 1 one group of four was mixed (reward
    0.0625, grad norm 0.19), the KL at step 2 was 9.0e-4 and the largest LoRA B entry 2.0e-4.

    Not grpo-lora.yaml, whose exact-match reward on made-up colours SmolLM2 never earns: measured, every one of its
    completions in 2 steps scored 0 and ran to the length limit, so loss and gradient were exactly 0 and the run
    trained nothing, which the old version of this test (global_step == 2) passed.
    """
    from safetensors.torch import load_file

    run = tmp_path / "run"
    code, out, err = run_cli("train", "recipes/real/arith-grpo.yaml", "--set", f"train.output_dir={run}",
                             "--set", "train.max_steps=2", "--set", "method.eval_samples=1", "--set",
                             "data.eval.0.samples=4", "--set", "method.beta=0.04", *FAST, timeout=1200)
    assert code == 0, (out + err)[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 2
    assert 2 in eos_ids(run / "final")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2]
    mixed = [m for m in steps if m["frac_reward_zero_std"] < 1]  # a group whose completions scored differently
    assert mixed and all(m["grad_norm"] > 0 for m in mixed), steps
    assert steps[0]["kl"] == pytest.approx(0, abs=1e-6) and steps[1]["kl"] > 0, [m["kl"] for m in steps]
    lora_b = [v for k, v in load_file(run / "final" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and max(v.abs().max().item() for v in lora_b) > 0  # LoRA's B starts at zero


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
