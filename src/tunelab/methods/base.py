"""The method contract: what shared code (validate, train, plan) may ask of a training method.

A method is one module (or package) in ``tunelab.methods``: its recipe block (a
``specs.MethodBlock``, the fields under ``method:``) and one ``Method`` object that says which
data it takes, how it is checked, what memory it needs, and how it trains, evaluates and
reports. ``METHODS`` (``methods/__init__.py``) maps the recipe's ``method.name`` to that object.
Shared code asks the object; it never compares method names, probes for attributes or imports a
method's module by name. Methods on a TRL trainer subclass ``TRLMethod``, which builds the TRL
config from the recipe in one way for all of them: every field tunelab sets comes with the recipe key
that decides it (``methods.common.training_fields`` + the method's ``trl_fields``), and ``method.trl``
setting one of those is an error naming that key. What ``train.py`` asks of the trainer a method builds
is ``MethodTrainer``; what it hands the trainer is ``RunHooks``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tempfile
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import Field

from tunelab.distributed.faults import Guards, NonFiniteGuard, PreemptionGuard
from tunelab.errors import Problem, closest
from tunelab.methods.common import Owned, Setting, training_fields
from tunelab.specs import MethodBlock, RecipeSpec


@dataclass
class MemoryTerms:
    """What ``tunelab plan`` counts for a method besides the trained model's weights and optimizer."""

    rows: int  # rows in one forward of the trained model
    tokens: int  # tokens per row
    notes: list[str] = field(default_factory=list)
    trained: str = "model"  # what the plan calls the trained model
    reference: bool = False  # a frozen copy of the starting weights
    critic: bool = False  # a trained score-head copy of the trained model
    reward_models: list[str] = field(default_factory=list)  # frozen score models, by path
    full_logits: bool = True  # False: the LM head's logits are never materialised whole (sft's fused head)


class MethodTrainer(Protocol):
    """What ``train.py`` asks of the trainer a method builds: transformers' (and TRL's) ``Trainer`` meets it as it
    is; a trainer of our own (PPO) implements it. Nothing else is asked of a trainer, and nothing is probed."""

    accelerator: Any  # accelerate's Accelerator: process count, distributed type, barriers
    state: Any  # global_step (transformers' TrainerState, or the same field on our own)
    model: Any  # the model as the trainer holds it

    def train(self, resume_from_checkpoint: str | None = None) -> Any:
        """Train to the end (from a complete checkpoint when given), running the run's hooks."""

    def save_model(self, output_dir: str | None = None) -> None:
        """Write the trained model (or adapter) to ``output_dir`` in HF format."""

    def is_world_process_zero(self) -> bool:
        """Whether this is the process that writes the run's files."""


@dataclass
class RunHooks:
    """What ``train.py`` hands every trainer it asks a method to build: the run's callbacks and its fault guards.

    A transformers/TRL trainer takes ``trainer_callbacks()``; a trainer of our own calls the callbacks'
    ``on_train_begin``/``on_log`` and runs the guards itself.
    """

    callbacks: list[Any] = field(default_factory=list)  # transformers TrainerCallbacks of the run (metrics.jsonl)
    guards: Guards = field(default_factory=lambda: Guards(PreemptionGuard(), NonFiniteGuard("stop")))

    def trainer_callbacks(self) -> list[Any]:
        """The callbacks plus the guards as transformers callbacks (preemption, non-finite, divergence)."""
        return [*self.callbacks, *self.guards.callbacks()]


B = TypeVar("B", bound=MethodBlock)


class Method(Generic[B]):
    """One training method: its recipe block, the data it takes, its checks, memory terms and trainer."""

    name: ClassVar[str]  # the recipe's method.name, the METHODS key
    config: type[B]  # the recipe block of method:
    formats: ClassVar[tuple[str, ...]]  # the data formats it trains on
    eval_before: ClassVar[bool] = False  # held-out evaluation also runs on the starting model (its report compares)
    owns_checkpointing: ClassVar[bool] = False  # its own trainer saves, checks and resumes checkpoints (not HF's)
    refused_strategies: ClassVar[dict[str, str]] = {}  # distributed.strategy -> why this method cannot run under it
    # the logged value the divergence guard watches (train.on_divergence); None: no logged value means divergence
    divergence_metric: ClassVar[str | None] = "loss"
    divergence_floor: ClassVar[float] = 0.0  # the least scale of its band, for a value that can start near 0

    def block(self, recipe: RecipeSpec) -> B:
        """The recipe's method block, typed as this method's."""
        block = recipe.method
        assert isinstance(block, self.config), f"{type(block).__name__} is not a {self.config.__name__}"
        return block

    @property
    def model_head(self) -> str:
        """causal | score: the head of the model it trains (a block fact: ``MethodBlock.model_head``)."""
        return self.config.model_head

    def check(self, recipe: RecipeSpec) -> list[Problem]:
        """Recipe checks beyond the schema, before any weights load (extend, keeping these)."""
        why = self.refused_strategies.get(recipe.distributed.strategy)
        if why:
            return [Problem("distributed.strategy", f"method {self.name} does not run under "
                            f"{recipe.distributed.strategy}: {why}")]
        return []

    def reward_specs(self, recipe: RecipeSpec) -> list[Any]:
        """The ``rewards.RewardSpec`` entries the method scores completions with (online RL), checked at validate."""
        return []

    def trl_problems(self, recipe: RecipeSpec) -> list[Problem]:
        """What the method's TRL config rejects of the recipe (methods on a TRL trainer)."""
        return []

    def trl_passthrough(self, recipe: RecipeSpec) -> dict[str, Any]:
        """The recipe's ``method.trl`` pass-through fields, if the method has them."""
        return {}

    def memory_terms(self, recipe: RecipeSpec, tokens: int, vocab: int) -> MemoryTerms:
        """The rows and models ``tunelab plan`` counts; ``tokens`` is the row length planned for."""
        return MemoryTerms(rows=recipe.train.batch_size, tokens=tokens)

    def build_trainer(self, recipe: RecipeSpec, model: Any, tokenizer: Any, train_ds: Any, eval_ds: Any,
                      hooks: RunHooks) -> MethodTrainer:
        """The trainer, running ``hooks`` (the run's callbacks and fault guards) in its loop."""
        raise NotImplementedError

    def trained_model(self, trainer: Any) -> Any:
        """The model ``trainer.save_model`` writes to final/ (train.py sets its stop tokens): the trainer's model."""
        return trainer.model

    def degradation(self, before: dict[str, Any] | None, after: dict[str, Any], factor: float) -> str | None:
        """Why held-out evaluation after training is far worse than before (``factor`` x the perplexity), or None."""
        if not before or "perplexity" not in before or "perplexity" not in after:
            return None
        b, a = float(before["perplexity"]), float(after["perplexity"])
        if a == a and a <= factor * b:  # (a NaN perplexity is worse than any)
            return None
        return (f"held-out perplexity rose from {b:.4g} before training to {a:.4g} after ({a / b:.3g}x, more than "
                f"train.divergence.eval_factor {factor:g}x)")

    def evaluate(self, model: Any, eval_ds: Any, recipe: RecipeSpec, tokenizer: Any) -> dict[str, Any]:
        """Held-out numbers of ``model`` on ``eval_ds`` (before and after training)."""
        raise NotImplementedError

    def report(self, before: dict[str, Any] | None, after: dict[str, Any],
               recipe: RecipeSpec) -> tuple[list[str], dict[str, Any]]:
        """Lines to print after training and entries for summary.json, from ``evaluate``'s results."""
        raise NotImplementedError


class TRLBlock(MethodBlock):
    """Base of the blocks of methods on a TRL trainer: the ``trl`` pass-through (declared here only)."""

    trl: dict[str, Any] = Field(default_factory=dict, description="extra fields of the method's TRL config "
                                "(SFTConfig, RewardConfig, DPOConfig, GRPOConfig), validated before training; a field "
                                "the recipe decides elsewhere (train.*, model.*, data.*, distributed.*, method.*) is "
                                "an error naming that key")


TB = TypeVar("TB", bound="TRLBlock")


class TRLMethod(Method[TB]):
    """A method on a TRL trainer: its config is TrainingArguments from the recipe + the method's fields + ``trl``."""

    def trl_config_class(self) -> type:
        """The TRL config class (imports TRL)."""
        raise NotImplementedError

    def trl_fields(self, recipe: RecipeSpec) -> dict[str, Setting]:
        """The TRL config fields the method sets from its block and the recipe, each with the key that decides it."""
        return {}

    def trl_settings(self, recipe: RecipeSpec) -> dict[str, Setting]:
        """Every field tunelab sets in the method's TRL config: TrainingArguments' and the method's own."""
        return {**training_fields(recipe), **self.trl_fields(recipe)}

    def trl_passthrough(self, recipe: RecipeSpec) -> dict[str, Any]:
        return dict(self.block(recipe).trl)

    def trl_config(self, recipe: RecipeSpec, **extra: Any) -> Any:
        """The TRL config of a recipe (raises TypeError/ValueError on a bad ``method.trl``)."""
        kwargs = {name: f.value for name, f in self.trl_settings(recipe).items()}
        kwargs.update(self.trl_passthrough(recipe))  # validate refused every owned field in it
        kwargs.update(extra)
        return self.trl_config_class()(**kwargs)

    def trl_problems(self, recipe: RecipeSpec) -> list[Problem]:
        """Build the TRL config the way training will, and report what it rejects."""
        trl = self.trl_passthrough(recipe)
        settings = self.trl_settings(recipe)
        problems = []
        for key in trl:
            owned = settings.get(key)
            if not isinstance(owned, Owned):
                continue
            if owned.key.startswith("tunelab:"):
                problems.append(Problem(f"method.trl.{key}", f"is fixed by tunelab ({owned.key[len('tunelab:'):].strip()})",
                                        "remove it from method.trl"))
            else:
                problems.append(Problem(f"method.trl.{key}", f"is decided by the recipe's {owned.key} (method.trl would "
                                        f"silently override it)", f"set {owned.key} instead"))
        if trl.get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
            # the Trainer would raise ImportError only after the weights are loaded
            problems.append(Problem("method.trl.use_liger_kernel", "needs the liger-kernel package, which is not "
                                    "installed", "pip install liger-kernel (tunelab[gpu]), or remove the key"))
        if problems:
            return problems
        try:
            with tempfile.TemporaryDirectory() as tmp:
                # without the DeepSpeed/FSDP part: building that forms the process group (checked in distributed_problems)
                self.trl_config(recipe, output_dir=tmp, report_to="none", deepspeed=None, fsdp=None, fsdp_config=None,
                                accelerator_config=None)
        except TypeError as exc:
            msg = str(exc)
            if "unexpected keyword argument" in msg and "'" in msg:
                bad = msg.split("'")[1]
                names = [f.name for f in dataclasses.fields(self.trl_config_class())]
                guess = closest(bad, names)
                problems.append(Problem(f"method.trl.{bad}", "unknown TRL config field",
                                        f"did you mean '{guess}'?" if guess else "see the TRL config docs"))
            else:
                problems.append(Problem("method.trl", msg))
        except ValueError as exc:
            problems.append(Problem("method.trl", f"TRL rejects the config: {exc}"))
        return problems
