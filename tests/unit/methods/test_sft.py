"""SFT (methods/sft.py): the direct loss path against TRL's fused LM head and against a loss computed by hand; the
packed-row collator and attention the SFT trainer picks.

For micro-batches whose scored logits are small, tunelab's SFTTrainer computes the loss from the
LM head applied at the labelled positions only (``tunelab.models.logits.scored_logits``); it must
give the same loss, gradients and logged metrics as TRL's own chunked fused head over every
position, which stays in use for large vocabularies.
"""

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from tunelab.methods import sft
from tunelab.models import attention
from tunelab.models.builtin import builtin_model, builtin_tokenizer
from tunelab.methods.base import RunHooks


def _rows(n: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        length = 9 + 5 * i
        ids = torch.randint(3, 1400, (length,), generator=g).tolist()
        labels = [-100] * (length // 2) + ids[length // 2 :]  # prompt masked, response trained
        out.append({"input_ids": ids, "labels": labels})
    return out


def _trainer(tmp_path, packing: bool, loss_type: str = "nll", model=None):
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, packing=packing, padding_free=packing,
                     packing_strategy="bfd", max_length=64, loss_type=loss_type, report_to="none", use_cpu=True,
                     bf16=False, gradient_checkpointing=False, assistant_only_loss=False, completion_only_loss=None)
    cls = sft.sft_trainer_class()
    return cls(model=model or builtin_model("tiny-llama"), args=args, train_dataset=Dataset.from_list(_rows()),
               processing_class=builtin_tokenizer())


def _loss_grads_metrics(trainer, batch, fused: bool):
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0
    fn = SFTTrainer.compute_loss if fused else type(trainer).compute_loss
    loss = fn(trainer, trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics, trainer._total_train_tokens


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_direct_loss_matches_trl_fused_head(tmp_path, packing, loss_type):
    trainer = _trainer(tmp_path, packing, loss_type)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    assert trainer._direct_loss_ok(batch)
    ours = _loss_grads_metrics(trainer, batch, fused=False)
    trl = _loss_grads_metrics(trainer, batch, fused=True)
    torch.testing.assert_close(ours[0], trl[0], atol=1e-5, rtol=1e-5)
    assert ours[1].keys() == trl[1].keys() and len(ours[1]) > 0
    for name in ours[1]:
        torch.testing.assert_close(ours[1][name], trl[1][name], atol=1e-5, rtol=1e-4, msg=name)
    for key in ("entropy", "mean_token_accuracy"):
        assert ours[2][key] == pytest.approx(trl[2][key], abs=1e-5), key
    assert ours[3] == trl[3]  # tokens counted for num_tokens


def test_direct_loss_equals_hand_computed_nll(tmp_path):
    trainer = _trainer(tmp_path, packing=False)
    trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = type(trainer).compute_loss(trainer, trainer.model, dict(batch))
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, count = 0.0, 0
    for b in range(logits.size(0)):
        for t in range(logits.size(1) - 1):
            label = int(batch["labels"][b, t + 1])
            if label == -100:
                continue
            row = logits[b, t].double()
            total += float(torch.logsumexp(row, 0) - row[label])  # -log softmax(row)[label]
            count += 1
    assert count > 0
    assert float(loss) == pytest.approx(total / count, rel=1e-5)


def test_large_vocabulary_uses_trl_fused_head(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, packing=True)
    batch = next(iter(trainer.get_train_dataloader()))
    assert trainer._direct_loss_ok(batch)
    scored = int((batch["labels"][:, 1:] != -100).sum())
    monkeypatch.setattr(sft, "FUSED_HEAD_MIN_LOGIT_BYTES", scored * 1536 * 4)
    assert not trainer._direct_loss_ok(batch)
    called = []
    monkeypatch.setattr(SFTTrainer, "compute_loss", lambda self, *a, **k: called.append(1) or torch.tensor(0.0))
    trainer.compute_loss(trainer.model, dict(batch))
    assert called == [1]


def test_prompt_tuning_logits_aligned(tmp_path):
    """Prompt tuning prepends virtual tokens to the logits; the loss must match TRL's on the real tokens."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    base = builtin_model("tiny-llama")
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))
    model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    trainer = _trainer(tmp_path, packing=False, model=model)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    ours = _loss_grads_metrics(trainer, batch, fused=False)
    trl = _loss_grads_metrics(trainer, batch, fused=True)
    torch.testing.assert_close(ours[0], trl[0], atol=1e-5, rtol=1e-5)
    for name in trl[1]:
        torch.testing.assert_close(ours[1][name], trl[1][name], atol=1e-5, rtol=1e-4, msg=name)


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))


def test_lm_head_runs_only_at_labelled_positions_with_the_plain_paths_gradients(tmp_path):
    """The headline of the direct path: the head sees the scored positions only, and the loss and
    LoRA gradients equal those of the plain path (full logits, masked cross-entropy)."""
    torch.manual_seed(0)
    model = _lora(builtin_model("tiny-llama"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    trainer = _trainer(tmp_path, packing=True, model=model)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    scored = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < scored < batch["input_ids"].numel()
    seen = []
    head = model.get_base_model().get_output_embeddings()
    hook = head.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[:-1].numel()))
    loss, grads, _, _ = _loss_grads_metrics(trainer, batch, fused=False)
    hook.remove()
    assert seen == [scored]
    model.zero_grad()
    logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "num_real_tokens")}, use_cache=False).logits
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                              batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    plain.backward()
    torch.testing.assert_close(loss, plain.detach(), atol=1e-6, rtol=1e-6)
    lora = [n for n in grads if "lora_" in n]
    assert lora
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_sdpa_recipe_uses_row_collator(tmp_path):
    """A packed SDPA run gets the per-row collator; TRL's concatenating one is kept only for flash-attention."""
    from datasets import Dataset

    from tunelab.data.collate import PackedRowsCollator
    from tunelab.methods import METHODS

    build_trainer = METHODS["sft"].build_trainer
    from tunelab.models.builtin import builtin_tokenizer
    from tunelab.recipe.load import load_recipe

    recipe = load_recipe("recipes/quickstart/sft.yaml", [f"train.output_dir={tmp_path}", "train.report_to=[none]"]).recipe
    rows = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in (30, 40, 50)]
    trainer = build_trainer(recipe, builtin_model("tiny-llama"), builtin_tokenizer(), Dataset.from_list(rows), None, RunHooks())
    assert isinstance(trainer.data_collator, PackedRowsCollator)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1  # three short rows best-fit into one packed row of 120
    assert batch["position_ids"][0].eq(0).sum() == 3


def test_sft_trainer_on_packed_rows_uses_it(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig

    from tunelab.methods import sft
    from tunelab.models.builtin import builtin_tokenizer

    rows = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (5, 9, 14)]
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, packing=True, padding_free=True,
                     packing_strategy="bfd", max_length=32, report_to="none", use_cpu=True, bf16=False)
    trainer = sft.sft_trainer_class()(model=builtin_model("tiny-llama"), args=args,
                                      train_dataset=Dataset.from_list(rows), processing_class=builtin_tokenizer())
    assert trainer.model.config._attn_implementation == "sdpa"  # the plain trainer leaves it
    from unittest import mock

    with mock.patch.object(sft.SFT, "trl_config", return_value=args):
        built = sft.SFT().build_trainer(mock.Mock(), builtin_model("tiny-llama"), builtin_tokenizer(),
                                        Dataset.from_list(rows), None, RunHooks())
    assert built.model.config._attn_implementation == attention.NAME
