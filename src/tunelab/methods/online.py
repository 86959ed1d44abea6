"""What the online RL methods (grpo, ppo) share: sampling fields, held-out evaluation, the report.

Held-out evaluation samples ``eval_samples`` completions per eval prompt at the training
temperature (what the reward was measured on during training) and one greedy completion, and
scores both with the recipe's reward functions. The report compares the starting model with
the trained one, and the mean training reward of the first and last 10% of steps.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from pydantic import Field, model_validator

from tunelab.data.collate import pad_left
from tunelab.eval.progress import progress
from tunelab.methods.base import Method
from tunelab.rewards import RewardSpec
from tunelab.rewards.compute import build_rewards, score_all
from tunelab.specs import MethodBlock, ModelRef, RecipeSpec


class OnlineRLBlock(MethodBlock):
    """Fields every online RL method has: rewards and how completions are sampled."""

    rewards: list[RewardSpec] = Field(min_length=1, description="reward functions and/or reward models, weighted")
    max_completion_length: int = Field(64, ge=1, description="tokens generated per completion at most")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling of the rollouts (1: off)")
    eval_samples: int = Field(4, ge=1, description="sampled completions per held-out prompt when evaluating")

    def model_refs(self) -> list[ModelRef]:
        return [ModelRef(f"method.rewards.{i}.model", r.model, "reward model", "score")
                for i, r in enumerate(self.rewards) if r.model]

    @model_validator(mode="after")
    def _reward_labels_unique(self) -> "OnlineRLBlock":
        labels = [r.label for r in self.rewards]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"two rewards are both called {sorted(dup)[0]!r}; their metrics would collide")
        return self


def reward_columns(dataset: Any) -> list[str]:
    """Dataset columns handed to reward functions: everything but the prompt and its token ids."""
    return [c for c in dataset.column_names if c not in ("prompt", "prompt_ids")]


def prompt_text(messages: Any) -> str:
    """The text reward functions see as the prompt: the last user message."""
    if isinstance(messages, str):
        return messages
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else ""


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end a completion: the tokenizer's eos and the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def sample(model: Any, tokenizer: Any, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float | None,
           top_p: float = 1.0) -> tuple[Any, Any, Any]:
    """Generate one completion per prompt: (left-padded prompts, prompt mask, completions).

    Completions are cut after their first stop token and right-padded with the pad id;
    ``temperature=None`` is greedy decoding.
    """
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = pad_left(prompt_ids, pad)
    ids, mask = ids.to(device), mask.to(device)
    stops = stop_token_ids(model, tokenizer)
    kwargs: dict[str, Any] = {"do_sample": False} if temperature is None else {
        "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             eos_token_id=stops, pad_token_id=pad, **kwargs)
    completions = out[:, ids.size(1):]
    return ids, mask, cut_at_stop(completions, stops, pad)


def cut_at_stop(completions: Any, stops: list[int], pad: int) -> Any:
    """Replace everything after each row's first stop token with ``pad`` (the stop token stays)."""
    import torch

    is_stop = torch.isin(completions, torch.tensor(stops, device=completions.device))
    after = (torch.cumsum(is_stop.int(), 1) - is_stop.int()) > 0  # strictly after the first stop
    return completions.masked_fill(after, pad)


def completion_mask(completions: Any, stops: list[int], pad: int) -> Any:
    """1 on each completion's tokens up to and including its first stop token."""
    import torch

    is_stop = torch.isin(completions, torch.tensor(stops, device=completions.device))
    # a row without a stop ran to max_new_tokens: all of it counts (generate pads only finished rows)
    return ((torch.cumsum(is_stop.int(), 1) - is_stop.int()) == 0).long()


OB = TypeVar("OB", bound="OnlineRLBlock")


class OnlineRL(Method[OB]):
    """What grpo and ppo share: prompt-only data, rewards, and a held-out report against the starting policy."""

    formats: ClassVar[tuple[str, ...]] = ("prompt",)
    eval_before = True  # the report compares the trained policy with the starting one

    def reward_specs(self, recipe: "RecipeSpec") -> list[Any]:
        return list(self.block(recipe).rewards)


    def evaluate(self, model: Any, eval_ds: Any, recipe: "RecipeSpec", tokenizer: Any) -> dict[str, Any]:
        """Mean reward (total and per function) of sampled and greedy completions on the eval prompts."""
        import torch

        m = self.block(recipe)
        funcs = build_rewards(m.rewards)
        torch.manual_seed(recipe.train.seed)  # the same draws before and after training: a paired comparison
        was_training = model.training
        model.eval()
        prompts = [eval_ds[i] for i in range(len(eval_ds))]
        columns = reward_columns(eval_ds)
        bs = recipe.train.eval_batch_size or recipe.train.batch_size
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        result: dict[str, Any] = {"prompts": len(prompts)}
        for mode, repeats, temperature in (("sampled", m.eval_samples, m.temperature), ("greedy", 1, None)):
            totals: list[float] = []
            per: dict[str, list[float]] = {}
            rows = [p for p in prompts for _ in range(repeats)]
            bar = progress(len(rows), f"eval {mode} completions", "completion")
            for start in range(0, len(rows), bs):
                chunk = rows[start:start + bs]
                bar.update(len(chunk))
                _, _, comp = sample(model, tokenizer, [r["prompt_ids"] for r in chunk], m.max_completion_length,
                                    temperature, m.top_p)
                texts = [tokenizer.decode([t for t in row if t != pad], skip_special_tokens=True) for row in comp.tolist()]
                total, by_fn = score_all(funcs, [prompt_text(r["prompt"]) for r in chunk], texts,
                                         {c: [r[c] for r in chunk] for c in columns})
                totals += total
                for k, v in by_fn.items():
                    per.setdefault(k, []).extend(x for x in v if x is not None)
            bar.close()
            result[mode] = {"reward": sum(totals) / len(totals),
                            **{k: sum(v) / len(v) for k, v in per.items() if v}}
        if was_training:
            model.train()
        return result

    def report(self, before: dict[str, Any] | None, after: dict[str, Any], recipe: "RecipeSpec") -> tuple[list[str], dict[str, Any]]:
        """Held-out reward before -> after training, sampled and greedy, per reward function."""
        lines = []
        out: dict[str, Any] = {}
        for mode in ("sampled", "greedy"):
            m = self.block(recipe)
            how = f"{m.eval_samples} samples at T={m.temperature}" if mode == "sampled" else "greedy"
            for key, value in after[mode].items():
                prev = before[mode].get(key) if before else None
                name = "mean reward" if key == "reward" else key
                text = f"{prev:.4f} -> {value:.4f}" if prev is not None else f"{value:.4f}"
                lines.append(f"held-out {name} ({how}, {after['prompts']} prompts): {text}")
                out[f"eval_{mode}_{key}"] = {"before": prev, "after": value}
        return lines, out
