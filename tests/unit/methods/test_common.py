"""What every method's trainer shares (methods/common.py): ``model.gradient_checkpointing`` from the recipe.

Activation checkpointing must really be on while training (each decoder layer then runs its forward
twice per micro batch: once in the forward pass, once recomputed in the backward pass) and must
change nothing but memory and time: the same loss and the same gradients as without it (measured:
bit-identical for full SFT, LoRA SFT with dropout and DPO; the tolerance is for other BLAS builds).
"""

import pytest
import torch
from transformers import TrainerCallback, set_seed

from tunelab.models.load import load_tokenizer
from tunelab.recipe.validate import validate
from tunelab.runs import RunDir
from tunelab.train import prepare_data, prepare_model
from tunelab.methods.base import RunHooks

CASES = {
    "sft": ("recipes/quickstart/sft.yaml", ['data.train=[{source: "builtin:quickstart/sft", format: messages, '
                                            'samples: 8}]']),
    # LoRA dropout 0.1: the recompute must draw the forward's dropout masks again (the RNG state is restored)
    "sft-lora": ("recipes/quickstart/sft-lora.yaml", ['data.train=[{source: "builtin:quickstart/sft", '
                                                      'format: messages, samples: 8}]', "peft.dropout=0.1"]),
    "dpo": ("recipes/quickstart/dpo.yaml", ["model.path=builtin:tiny-llama", 'data.train=[{source: '
                                            '"builtin:quickstart/preference", format: preference, samples: 8}]']),
}


class Grab(TrainerCallback):
    """The model's checkpointing flag and its (clipped) gradients just before the optimizer steps."""

    def __init__(self) -> None:
        self.seen: dict = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.seen["checkpointing"] = model.is_activation_checkpointing
        self.seen["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _counted(forward, calls: list):
    def run(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    return run


def _one_step(tmp_path, case: str, checkpointing: bool) -> tuple[float, dict, int, int]:
    """(loss, gradients, checkpointing flag, decoder-layer forward calls, decoder layers) of one training step."""
    recipe, extra = CASES[case]
    resolved = validate(recipe, [f"train.output_dir={tmp_path}", "train.report_to=[none]", "train.max_steps=1",
                                 "train.batch_size=8", "train.logging_steps=1", "train.save_steps=1000",
                                 "train.eval_before_train=false", "data.eval=[]", *extra,
                                 f"model.gradient_checkpointing={str(checkpointing).lower()}"])
    run = RunDir(tmp_path)
    run.root.mkdir(parents=True)
    set_seed(resolved.recipe.train.seed)
    tokenizer = load_tokenizer(resolved.recipe.model)
    train_ds, _, _, _ = prepare_data(resolved, run, tokenizer)
    model = prepare_model(resolved, run, tokenizer)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    grab = Grab()
    trainer = resolved.method.build_trainer(resolved.recipe, model, tokenizer, train_ds, None, RunHooks([grab]))
    calls: list[int] = []
    for layer in base.model.layers:  # the policy's (DPO's reference copy is made by now, and not counted)
        # inside the checkpointed layer: runs again when the backward recomputes it (module hooks do not fire there)
        layer.mlp.forward = _counted(layer.mlp.forward, calls)
    trainer.train()
    loss = next(row["loss"] for row in trainer.state.log_history if "loss" in row)
    return loss, grab.seen, len(calls), len(base.model.layers)


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_checkpointing_is_on_and_changes_no_gradient(tmp_path, case):
    loss, seen, calls, layers = _one_step(tmp_path / "plain", case, checkpointing=False)
    loss_gc, seen_gc, calls_gc, _ = _one_step(tmp_path / "gc", case, checkpointing=True)
    assert (seen["checkpointing"], seen_gc["checkpointing"]) == (False, True)
    assert (calls, calls_gc) == (layers, 2 * layers)  # one micro batch: forward, and the recompute in backward
    assert loss_gc == pytest.approx(loss, rel=1e-6)
    assert seen_gc["grads"].keys() == seen["grads"].keys() and seen["grads"]
    for name, grad in seen["grads"].items():
        torch.testing.assert_close(seen_gc["grads"][name], grad, atol=1e-7, rtol=1e-5, msg=name)
