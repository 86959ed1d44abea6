"""The PPO training loop: rollout, score, advantages, clipped updates of policy and critic.

Read top to bottom: ``PPOTrainer.train`` runs ``step`` = ``rollout`` + ``update`` per batch of
prompts; the formulas are in ``core``. Runs on one process or under accelerate, with DDP or
DeepSpeed ZeRO-2: every process rolls out its own prompts, gradients are averaged across
processes, logged numbers are averaged over processes.

The policy and the critic are one module (``ActorCritic``) with one optimizer of two parameter
groups (their own learning rates) and one backward of policy loss + value loss per minibatch:
DDP and DeepSpeed each wrap exactly one model, and because the two networks share no
parameter, the gradient of the sum is each network's own gradient. Gradients are clipped per
network (``max_grad_norm`` each), except under DeepSpeed, whose engine clips all of them together.

Checkpoints hold the trainable weights (safetensors), the optimizer and scheduler states and the
KL coefficient (under DeepSpeed the optimizer state is the engine's, one shard per rank); they
are written under ``.staging/`` and renamed.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from tunelab.distributed.config import deepspeed_config, resolve_precision
from tunelab.errors import UserError
from tunelab.log import say
from tunelab.methods.common import checkpoint_write_error
from tunelab.methods.online import completion_mask, prompt_text, reward_columns, sample, stop_token_ids
from tunelab.methods.ppo import core
from tunelab.methods.ppo.block import PPOBlock
from tunelab.models.inference import load_reward_model
from tunelab.models.load import frozen_reference, load_model
from tunelab.models.peft import apply_peft, quantization_of
from tunelab.rewards.compute import build_rewards, score_all
from tunelab.runs import RunDir
from tunelab.specs import RecipeSpec

if TYPE_CHECKING:
    from tunelab.methods.base import RunHooks


class ValueModel(nn.Module):
    """V(s_t) at every position: a sequence-classification model's body and its one-output head.

    A module of its own (rather than calling the body and head from outside) so that DDP sees
    one forward per backward and averages the critic's gradients.
    """

    net: Any  # a transformers sequence classifier (or a PeftModel of one): its body is found by name

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        base = self.net.get_base_model() if hasattr(self.net, "get_base_model") else self.net
        body = getattr(base, base.base_model_prefix)
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return base.score(hidden).squeeze(-1).float()


class ActorCritic(nn.Module):
    """The policy and the critic as one module: one forward, one backward, one optimizer per update."""

    policy: Any  # a transformers causal LM (or a PeftModel of one)

    def __init__(self, policy: nn.Module, critic: ValueModel) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy logits, values) at every position."""
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        return logits, self.critic(input_ids, attention_mask, position_ids)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off: the ratio π/π_old must be 1 before the first update, not noise."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by name, each storage once (tied weights would break safetensors)."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            out[name] = p.detach().contiguous().cpu()
    return out


def build_critic(recipe: "RecipeSpec", tokenizer: Any) -> nn.Module:
    """The critic's network: a score head on a copy of the policy's body, the reward model, or a path."""
    m = cast(PPOBlock, recipe.method)
    if m.critic == "reward_model":
        path = next(r.model for r in m.rewards if r.model)
        net, _ = load_reward_model(path)
        if hasattr(net, "merge_and_unload"):
            net = net.merge_and_unload()
    else:
        spec = recipe.model if m.critic == "policy" else recipe.model.model_copy(update={"path": m.critic,
                                                                                           "revision": None})
        net = load_model(spec, quantization_of(recipe), full_finetune=recipe.peft is None, head="score")
    net.config.pad_token_id = tokenizer.pad_token_id
    if recipe.peft is not None:
        net = apply_peft(net, recipe.peft, tokenizer, recipe.model.gradient_checkpointing, head="score")
    else:
        for p in net.parameters():
            p.requires_grad_(True)
    return net


class PPOTrainer:
    """PPO on a prompt-only dataset; meets ``methods.base.MethodTrainer`` (train, save_model, state, accelerator)."""

    def __init__(self, recipe: "RecipeSpec", model: Any, tokenizer: Any, train_ds: Any, hooks: "RunHooks") -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, InitProcessGroupKwargs
        from transformers import get_scheduler

        self.recipe, self.m, self.t = recipe, cast(PPOBlock, recipe.method), recipe.train
        self.tokenizer, self.dataset = tokenizer, train_ds
        self.callbacks, self.guards = hooks.callbacks, hooks.guards  # metrics.jsonl; preemption, non-finite, divergence
        precision = resolve_precision(self.t.precision)
        plugin = None
        if recipe.distributed.strategy.startswith("zero"):
            # the recipe's DeepSpeed JSON (micro batch = one PPO minibatch, no accumulation, clipping):
            # ZeRO without any accelerate flag, as for the HF/TRL methods
            from accelerate.utils import DeepSpeedPlugin

            plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(recipe, int(os.environ.get("WORLD_SIZE", "1"))))
        deepspeed_on_cpu = (plugin is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true") \
            and not torch.cuda.is_available()
        self.accelerator = Accelerator(
            deepspeed_plugin=plugin,
            # DeepSpeed on a CPU (tests, CI): accelerate forms the process group only if told gloo
            cpu=not torch.cuda.is_available() and not deepspeed_on_cpu,
            kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if deepspeed_on_cpu else None,
            mixed_precision="bf16" if precision == "bf16" else "fp16" if precision == "fp16" else "no")
        self.peft = recipe.peft is not None
        disable_dropout(model)
        # the reference: adapters off under PEFT, else an explicit model or a frozen copy of the start
        self.ref: nn.Module | None = frozen_reference(recipe.model, model, self.m.reference, not self.peft)
        if self.ref is not None:
            self.ref.to(self.accelerator.device)
        critic = ValueModel(build_critic(recipe, tokenizer))
        disable_dropout(critic)
        self.rewards = [f.load(self.accelerator.device) for f in build_rewards(self.m.rewards)]
        self.columns = reward_columns(train_ds)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.stops = stop_token_ids(model, tokenizer)

        world = self.accelerator.num_processes
        per_step = self.t.batch_size * world
        self.total_steps = self.t.max_steps if self.t.max_steps > 0 else max(
            1, math.ceil(self.t.epochs * len(train_ds) / per_step))
        updates = self.total_steps * self.m.ppo_epochs * self.m.num_minibatches
        warmup = int(self.t.warmup_ratio * updates)

        def trainable(net: nn.Module) -> list[nn.Parameter]:
            return [p for p in net.parameters() if p.requires_grad]

        self.opt = torch.optim.AdamW(
            [{"params": trainable(model), "lr": self.t.learning_rate},
             {"params": trainable(critic), "lr": self.m.critic_learning_rate or self.t.learning_rate}],
            weight_decay=self.t.weight_decay)
        self.sched = get_scheduler(self.t.lr_scheduler, self.opt, num_warmup_steps=warmup, num_training_steps=updates)
        self.deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed:
            if self.accelerator.state.deepspeed_plugin.zero_stage == 3:
                raise UserError("method: ppo runs under DeepSpeed ZeRO-0, 1 and 2, not ZeRO-3: rollouts generate "
                                "with the whole policy and score with the reference on every rank; use distributed.strategy: zero2")
            # (launched with --use_deepspeed rather than distributed.strategy: the plugin's config has "auto"s)
            # no dataloader to infer these from; clipping is the engine's (all parameters together)
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            config["train_micro_batch_size_per_gpu"] = self.t.batch_size // self.m.num_minibatches
            config["gradient_accumulation_steps"] = 1
            config["gradient_clipping"] = self.t.max_grad_norm
        self.model, self.opt = self.accelerator.prepare(ActorCritic(model, critic), self.opt)
        self.kl = core.AdaptiveKL(self.m.kl_coef, self.m.target_kl, self.m.kl_horizon)
        self.state = SimpleNamespace(global_step=0, epoch=0.0, max_steps=self.total_steps,
                                     is_world_process_zero=self.accelerator.is_main_process)
        self.generator = torch.Generator()
        self.trainable_params = trainable(model) + trainable(critic)

    @property
    def unwrapped(self) -> ActorCritic:
        """The ActorCritic without its DDP/DeepSpeed wrapper (for generation, scoring and saving)."""
        return self.accelerator.unwrap_model(self.model)

    # ---- the interface train.py uses ------------------------------------------------------------

    def is_world_process_zero(self) -> bool:
        return self.accelerator.is_main_process

    def train(self, resume_from_checkpoint: str | None = None) -> None:
        """Run ``total_steps`` PPO steps (from a checkpoint's step when resuming), logging each."""
        if resume_from_checkpoint:
            self.load_checkpoint(Path(resume_from_checkpoint))
            world, b = self.accelerator.num_processes, self.t.batch_size
            epoch, at = divmod(self.state.global_step * world * b, len(self.dataset))
            say(f"resumed at step {self.state.global_step} of {self.total_steps} (KL coefficient {self.kl.value:.6g}); "
                f"data: epoch {epoch + 1}, continuing after prompt {at} of {len(self.dataset)} in the epoch's seeded "
                "order (sampling seeds follow the step, as in the uncut run)")
        for cb in self.callbacks:
            cb.on_train_begin(None, self.state, None)
        logged: list[dict[str, float]] = []
        while self.state.global_step < self.total_steps:
            # sampling and minibatch order depend only on (seed, step, rank): a resumed run repeats the uncut one
            seed = self.t.seed * 100_003 + self.state.global_step * 97 + self.accelerator.process_index
            torch.manual_seed(seed)
            self.generator.manual_seed(seed)
            stats = self.step(self.batch_rows(self.state.global_step))
            self.state.global_step += 1
            self.state.epoch = self.state.global_step * self.t.batch_size * self.accelerator.num_processes / len(
                self.dataset)
            logged.append(stats)
            if self.state.global_step % self.t.logging_steps == 0 or self.state.global_step == self.total_steps:
                row = {k: sum(s[k] for s in logged) / len(logged) for k in logged[-1]}
                row = {k: round(v, 6) for k, v in row.items()}
                logged = []
                if self.accelerator.is_main_process:
                    say(f"ppo step {self.state.global_step}/{self.total_steps}: reward "
                          f"{row['reward']:+.4f} kl {row['kl']:.4f} entropy {row['entropy']:.3f} "
                          f"clipfrac {row['clipfrac']:.3f}")
                for cb in self.callbacks:
                    cb.on_log(None, self.state, None, logs=row)
                self.guards.divergence.observe(self.state.global_step, row)  # before this step is checkpointed
            if self.state.global_step < self.total_steps and self.guards.preemption.requested():
                self.guards.preemption.stopped_at = self.state.global_step  # preempted: a checkpoint of this step, then stop
                self.save_checkpoint()
                return
            if self.state.global_step % self.t.save_steps == 0 and self.state.global_step < self.total_steps:
                self.save_checkpoint()

    @property
    def saved_model(self) -> Any:
        """The model ``save_model`` writes (the policy): where ``train`` sets the stop tokens."""
        return self.unwrapped.policy

    def save_model(self, output_dir: str | None = None) -> None:
        """The policy in HF format (a PEFT adapter under PEFT); the critic in ``critic/`` if asked."""
        path = output_dir or os.path.join(self.t.output_dir, "final")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.unwrapped.policy.save_pretrained(path)
            if self.m.save_critic:
                self.unwrapped.critic.net.save_pretrained(os.path.join(path, "critic"))
        self.accelerator.wait_for_everyone()

    # ---- one step -------------------------------------------------------------------------------

    def batch_rows(self, step: int) -> list[dict[str, Any]]:
        """This process's prompts for ``step``: a seeded shuffle of the dataset per epoch, sharded by rank."""
        n, b = len(self.dataset), self.t.batch_size
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        start = (step * world + rank) * b
        rows = []
        for k in range(start, start + b):
            epoch, i = divmod(k, n)
            order = list(range(n))
            random.Random(self.recipe.data.seed + epoch).shuffle(order)
            rows.append(self.dataset[order[i]])
        return rows

    def step(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        batch, stats = self.rollout(rows)
        stats.update(self.update(batch))
        self.kl.update(stats["kl"], len(rows) * self.accelerator.num_processes)
        return {k: float(self.accelerator.reduce(torch.tensor(v, device=self.accelerator.device), "mean"))
                for k, v in stats.items()}

    def completion_logprobs(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log π(a_t|s_t), logits) of the completion tokens, logits scaled by the sampling temperature."""
        logits = logits[:, batch["prompt_len"] - 1 : -1].float() / self.m.temperature
        logp = torch.log_softmax(logits, -1).gather(-1, batch["completion"][..., None])[..., 0]
        return logp, logits

    def forward_logprobs(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``completion_logprobs`` of a causal LM's forward pass over the batch."""
        logits = model(input_ids=batch["ids"], attention_mask=batch["attn"], position_ids=batch["pos"]).logits
        return self.completion_logprobs(logits, batch)

    @torch.no_grad()
    def rollout(self, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, float]]:
        """Sample completions, score them, and turn scores and KL into advantages and returns."""
        m, device = self.m, self.accelerator.device
        policy, critic = self.unwrapped.policy, self.unwrapped.critic
        self.model.eval()
        prompt_ids, prompt_mask, completion = sample(policy, self.tokenizer, [r["prompt_ids"] for r in rows],
                                                     m.max_completion_length, m.temperature, m.top_p)
        mask = completion_mask(completion, self.stops, self.pad)
        width = int(mask.sum(1).max())
        completion, mask = completion[:, :width], mask[:, :width]
        attn = torch.cat([prompt_mask, mask], 1)
        batch = {"ids": torch.cat([prompt_ids, completion], 1), "attn": attn, "pos": (attn.cumsum(1) - 1).clamp(min=0),
                 "completion": completion, "mask": mask.float(), "prompt_len": prompt_ids.size(1)}

        old_logp, logits = self.forward_logprobs(policy, batch)
        entropy = core.masked_mean(core.entropy_from_logits(logits), batch["mask"])
        del logits
        if self.ref is not None:
            ref_logp, _ = self.forward_logprobs(self.ref, batch)
        else:
            with policy.disable_adapter():
                ref_logp, _ = self.forward_logprobs(policy, batch)
        values = critic(batch["ids"], batch["attn"], batch["pos"])[:, batch["prompt_len"] - 1 : -1]

        texts = [self.tokenizer.decode(c[: int(n)].tolist(), skip_special_tokens=True)
                 for c, n in zip(completion, mask.sum(1))]
        total, by_fn = score_all(self.rewards, [prompt_text(r["prompt"]) for r in rows], texts,
                                 {c: [r[c] for r in rows] for c in self.columns})
        score = torch.tensor(total, dtype=torch.float32, device=device)
        ended = torch.isin(completion, torch.tensor(self.stops, device=device)).any(1)
        if m.missing_eos_penalty is not None:
            score = score - m.missing_eos_penalty * (~ended).float()
        if m.score_clip is not None:
            score = score.clamp(-m.score_clip, m.score_clip)

        kl = core.kl_estimate(old_logp, ref_logp, m.kl_estimator) * batch["mask"]
        rewards = core.token_rewards(score, kl, batch["mask"], self.kl.value)
        advantages, returns = core.gae(rewards, values, batch["mask"], m.gamma, m.lam)
        if m.whiten_advantages:
            advantages = core.whiten(advantages, batch["mask"])
        batch.update(old_logp=old_logp, values=values, advantages=advantages, returns=returns)

        stats = {"reward": float(score.mean()), "kl": float(kl.sum(1).mean()), "kl_coef": self.kl.value,
                 # per completion token: what the divergence guard watches (methods/ppo: divergence_metric)
                 "kl_per_token": float(kl.sum() / batch["mask"].sum().clamp(min=1)),
                 "non_score_reward": float((-self.kl.value * kl).sum(1).mean()), "entropy": float(entropy),
                 "completion_length": float(mask.sum(1).float().mean()), "eos_fraction": float(ended.float().mean())}
        for label, values_ in by_fn.items():
            got = [v for v in values_ if v is not None]
            stats[f"reward/{label}"] = sum(got) / len(got) if got else 0.0
        return batch, stats

    def update(self, batch: dict[str, Any]) -> dict[str, float]:
        """``ppo_epochs`` passes of ``num_minibatches`` clipped policy and value updates."""
        m = self.m
        self.model.train()
        n = batch["ids"].size(0)
        size = n // m.num_minibatches
        sums: dict[str, float] = {}
        count = 0
        for _ in range(m.ppo_epochs):
            order = torch.randperm(n, generator=self.generator)
            for k in range(m.num_minibatches):
                idx = order[k * size : (k + 1) * size].to(batch["ids"].device)
                mb = {key: (v[idx] if isinstance(v, torch.Tensor) else v) for key, v in batch.items()}
                mask = mb["mask"]

                logits, values = self.model(mb["ids"], mb["attn"], mb["pos"])
                logp, logits = self.completion_logprobs(logits, mb)
                pg_loss, pg_stats = core.policy_loss(logp, mb["old_logp"], mb["advantages"], mask, m.clip)
                entropy = core.masked_mean(core.entropy_from_logits(logits), mask)
                values = values[:, mb["prompt_len"] - 1 : -1]
                v_loss, v_stats = core.value_loss(values, mb["values"], mb["returns"], mask, m.value_clip)
                loss = pg_loss - m.entropy_coef * entropy + v_loss
                step = self.state.global_step + 1
                # before backward: under DeepSpeed the engine updates inside it, where no gradient check can reach
                if self.guards.nonfinite.check_loss(loss, step):
                    # the networks share no parameter: each gets the gradient of its own loss
                    self.accelerator.backward(loss)
                    if self.t.max_grad_norm > 0 and not self.deepspeed:
                        for net in (self.unwrapped.policy, self.unwrapped.critic):
                            torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None],
                                                           self.t.max_grad_norm)
                    if self.guards.nonfinite.check(self.trainable_params, step):
                        self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)

                step_stats = {"loss": loss.item(), "policy_loss": pg_loss.item(), "value_loss": v_loss.item(),
                              "update_entropy": entropy.item(), **{k: v.item() for k, v in pg_stats.items()},
                              **{k: v.item() for k, v in v_stats.items()}}
                for key, v in step_stats.items():
                    sums[key] = sums.get(key, 0.0) + v
                count += 1
        out = {k: v / count for k, v in sums.items()}
        out["explained_variance"] = float(core.explained_variance(batch["values"], batch["returns"], batch["mask"]))
        out["learning_rate"] = self.sched.get_last_lr()[0]
        return out

    # ---- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """checkpoint-N/: trainable weights, optimizer/scheduler states, step and KL coefficient."""

        run = RunDir(Path(self.t.output_dir))
        staging = run.staging / f"checkpoint-{self.state.global_step}"
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        if self.deepspeed:  # every rank writes its shard of the optimizer state
            self.model.save_checkpoint(str(staging), tag="deepspeed", exclude_frozen_parameters=True)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            try:
                self._write_checkpoint(run, staging)
            except OSError as exc:  # a full disk: the published checkpoints are untouched
                raise checkpoint_write_error(run, self.state.global_step, exc) from exc
        self.accelerator.wait_for_everyone()

    def _write_checkpoint(self, run: RunDir, staging: Path) -> None:
        from safetensors.torch import save_file

        if True:
            for tag in ("policy", "critic"):
                save_file(trainable_state(getattr(self.unwrapped, tag)), str(staging / f"{tag}.safetensors"))
            state = {"scheduler": self.sched.state_dict()}
            if not self.deepspeed:
                state["optimizer"] = self.opt.state_dict()
            torch.save(state, staging / "optimizer.pt")
            (staging / "trainer_state.json").write_text(json.dumps(
                {"global_step": self.state.global_step, "kl_coef": self.kl.value, "total_steps": self.total_steps,
                 "deepspeed": self.deepspeed, "world_size": self.accelerator.num_processes}))
            run.publish_checkpoint(staging, self.t.save_total_limit)

    def load_checkpoint(self, path: Path) -> None:
        """Restore what ``save_checkpoint`` wrote; the data order and sampling seeds follow the step."""
        from safetensors.torch import load_file

        meta = json.loads((path / "trainer_state.json").read_text())
        if bool(meta.get("deepspeed")) != self.deepspeed:
            saved = "with" if meta.get("deepspeed") else "without"
            raise UserError(f"{path} was written {saved} DeepSpeed; resume it the same way (the optimizer state "
                            "is stored differently), or start a new run from its weights")
        if self.deepspeed and meta.get("world_size") != self.accelerator.num_processes:
            raise UserError(f"{path} holds DeepSpeed optimizer shards for {meta.get('world_size')} processes; "
                            f"this run has {self.accelerator.num_processes}: resume at the same world size")
        for tag in ("policy", "critic"):
            net = getattr(self.unwrapped, tag)
            weights = load_file(str(path / f"{tag}.safetensors"))
            missing = set(weights) - {n for n, _ in net.named_parameters()}
            if missing:
                raise RuntimeError(f"{path}/{tag}.safetensors does not fit this model: {sorted(missing)[:3]}")
            net.load_state_dict(weights, strict=False)
        state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        if self.deepspeed:
            # its fp32 master weights and moments, this rank's shard (the module weights equal the safetensors)
            self.model.load_checkpoint(str(path), tag="deepspeed", load_module_strict=False,
                                       load_lr_scheduler_states=False)
        else:
            self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.state.global_step = meta["global_step"]
        self.kl.value = meta["kl_coef"]
