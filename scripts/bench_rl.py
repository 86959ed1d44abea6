"""Online RL throughput on this machine, measured side by side in one run.

1. GRPO: tunelab's GRPO (recipe -> build_trainer) against TRL's GRPOTrainer driven directly with
   the same GRPOConfig, model, data and reward; wall time of ``--steps`` training steps each,
   alternating, ``--reps`` times. Ratio = TRL time / tunelab time (>= 0.95: the wrapper adds no
   overhead).
2. PPO vs GRPO: completions per second at the same batch (completions per step), completion
   length and model; PPO runs its rollout + ``ppo_epochs`` updates of policy and critic.

The model is the built-in tiny Llama, freshly initialised (it rarely emits EOS, so every
completion runs to max_completion_length: equal lengths on both sides).

    python scripts/bench_rl.py [--steps 10] [--reps 2] [--batch 16] [--length 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent


def recipe_for(method: str, out: str, steps: int, batch: int, length: int):
    from tunelab.recipe.load import load_recipe

    overrides = ["model.path=builtin:tiny-llama", f"train.output_dir={out}", f"train.max_steps={steps}",
                 f"train.batch_size={batch}", f"method.max_completion_length={length}", "train.save_steps=100000",
                 "train.report_to=[none]", "train.logging_steps=1"]
    if method == "grpo":
        overrides.append("method.num_generations=8")
    return load_recipe(ROOT / f"recipes/quickstart/{method}.yaml", overrides).recipe


def data(recipe):
    from tunelab.data.pipeline import build_datasets
    from tunelab.models.builtin import builtin_tokenizer

    tok = builtin_tokenizer()
    train, _, _ = build_datasets(recipe, tok)
    return tok, train


def time_tunelab(method: str, steps: int, batch: int, length: int) -> float:
    from transformers import set_seed

    from tunelab.methods import method_of
    from tunelab.models.builtin import builtin_model

    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_for(method, tmp, steps, batch, length)
        tok, train = data(recipe)
        set_seed(0)
        trainer = method_of(recipe.method).build_trainer(recipe, builtin_model("tiny-llama"), tok, train, None, [])
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def time_trl_grpo(steps: int, batch: int, length: int) -> float:
    from transformers import set_seed
    from trl import GRPOTrainer

    from tunelab.methods import METHODS
    from tunelab.models.builtin import builtin_model

    def accuracy(prompts, completions, answer, **kwargs):
        norm = lambda s: " ".join(s.strip().lower().split()).rstrip(".!?")  # noqa: E731
        return [float(norm(c[0]["content"]) == norm(a)) for c, a in zip(completions, answer)]

    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_for("grpo", tmp, steps, batch, length)
        tok, train = data(recipe)
        tok.padding_side = "left"
        set_seed(0)
        trainer = GRPOTrainer(model=builtin_model("tiny-llama"), reward_funcs=[accuracy], args=METHODS["grpo"].trl_config(recipe),
                              train_dataset=train.remove_columns(["prompt_ids"]), processing_class=tok)
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="completions per step (PPO: prompts per step)")
    ap.add_argument("--length", type=int, default=32, help="max_completion_length")
    a = ap.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}; "
          f"{a.steps} steps x batch {a.batch} x {a.length} tokens, {a.reps} reps", flush=True)
    trl_t, ours_t, ppo_t = [], [], []
    for rep in range(a.reps):
        trl_t.append(time_trl_grpo(a.steps, a.batch, a.length))
        ours_t.append(time_tunelab("grpo", a.steps, a.batch, a.length))
        ppo_t.append(time_tunelab("ppo", a.steps, a.batch, a.length))
        print(f"rep {rep + 1}: TRL GRPO {trl_t[-1]:.2f} s, tunelab GRPO {ours_t[-1]:.2f} s, tunelab PPO "
              f"{ppo_t[-1]:.2f} s", flush=True)
    trl_m, ours_m, ppo_m = statistics.median(trl_t), statistics.median(ours_t), statistics.median(ppo_t)
    samples = a.steps * a.batch
    print(f"GRPO step time: TRL {trl_m / a.steps:.3f} s, tunelab {ours_m / a.steps:.3f} s "
          f"(median of {a.reps}); ratio TRL/tunelab = {trl_m / ours_m:.3f}")
    print(f"completions/s: GRPO (tunelab) {samples / ours_m:.1f}, PPO {samples / ppo_m:.1f}; "
          f"PPO/GRPO = {ours_m / ppo_m:.3f}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
