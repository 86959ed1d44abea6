"""The method contract: what shared code (validate, train, plan) may ask of a training method.

A method is one module (or package) in ``tunelab.methods``: its recipe block (a
``specs.MethodBlock``, the fields under ``method:``) and one ``Method`` object that says which
data it takes, how it is checked, what memory it needs, and how it trains, evaluates and
reports. ``METHODS`` (``methods/__init__.py``) maps the recipe's ``method.name`` to that object.
Shared code asks the object; it never compares method names, probes for attributes or imports a
method's module by name. Methods on a TRL trainer subclass ``TRLMethod``, which builds the TRL
config from the recipe in one way for all of them and owns one list of the fields tunelab sets.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import Field

from tunelab.errors import Problem, closest
from tunelab.methods.common import training_arguments
from tunelab.specs import MethodBlock

if TYPE_CHECKING:
    from tunelab.recipe.schema import Recipe


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


B = TypeVar("B", bound=MethodBlock)


class Method(Generic[B]):
    """One training method: its recipe block, the data it takes, its checks, memory terms and trainer."""

    name: ClassVar[str]  # the recipe's method.name, the METHODS key
    config: type[B]  # the recipe block of method:
    formats: ClassVar[tuple[str, ...]]  # the data formats it trains on
    eval_before: ClassVar[bool] = False  # held-out evaluation also runs on the starting model (its report compares)
    owns_checkpointing: ClassVar[bool] = False  # its own trainer saves, checks and resumes checkpoints (not HF's)
    refused_strategies: ClassVar[dict[str, str]] = {}  # distributed.strategy -> why this method cannot run under it

    def block(self, recipe: Recipe) -> B:
        """The recipe's method block, typed as this method's."""
        block = recipe.method
        assert isinstance(block, self.config), f"{type(block).__name__} is not a {self.config.__name__}"
        return block

    @property
    def model_head(self) -> str:
        """causal | score: the head of the model it trains (a block fact: ``MethodBlock.model_head``)."""
        return self.config.model_head

    def check(self, recipe: Recipe) -> list[Problem]:
        """Recipe checks beyond the schema, before any weights load (extend, keeping these)."""
        why = self.refused_strategies.get(recipe.distributed.strategy)
        if why:
            return [Problem("distributed.strategy", f"method {self.name} does not run under "
                            f"{recipe.distributed.strategy}: {why}")]
        return []

    def reward_specs(self, recipe: Recipe) -> list[Any]:
        """The ``rewards.RewardSpec`` entries the method scores completions with (online RL), checked at validate."""
        return []

    def trl_problems(self, recipe: Recipe) -> list[Problem]:
        """What the method's TRL config rejects of the recipe (methods on a TRL trainer)."""
        return []

    def trl_passthrough(self, recipe: Recipe) -> dict[str, Any]:
        """The recipe's ``method.trl`` pass-through fields, if the method has them."""
        return {}

    def memory_terms(self, recipe: Recipe, tokens: int, vocab: int) -> MemoryTerms:
        """The rows and models ``tunelab plan`` counts; ``tokens`` is the row length planned for."""
        return MemoryTerms(rows=recipe.train.batch_size, tokens=tokens)

    def build_trainer(self, recipe: Recipe, model: Any, tokenizer: Any, train_ds: Any, eval_ds: Any,
                      callbacks: list[Any]) -> Any:
        """The trainer (transformers' ``Trainer`` interface: ``train``, ``save_model``, ``state``, ``accelerator``)."""
        raise NotImplementedError

    def evaluate(self, model: Any, eval_ds: Any, recipe: Recipe, tokenizer: Any) -> dict[str, Any]:
        """Held-out numbers of ``model`` on ``eval_ds`` (before and after training)."""
        raise NotImplementedError

    def report(self, before: dict[str, Any] | None, after: dict[str, Any],
               recipe: Recipe) -> tuple[list[str], dict[str, Any]]:
        """Lines to print after training and entries for summary.json, from ``evaluate``'s results."""
        raise NotImplementedError


class TRLBlock(MethodBlock):
    """Base of the blocks of methods on a TRL trainer: the ``trl`` pass-through."""

    trl: dict[str, Any] = Field(default_factory=dict, description="extra fields of the method's TRL config "
                                "(SFTConfig, DPOConfig, ...), validated before training")


# TrainingArguments fields tunelab sets from train:, model: and data:, for every TRL method. Setting one
# in method.trl would fight the recipe; the method's own fields (``trl_fields``) are owned as well.
OWNED_TRL_FIELDS = frozenset({
    "output_dir", "num_train_epochs", "max_steps", "learning_rate", "per_device_train_batch_size",
    "gradient_accumulation_steps", "seed", "bf16", "fp16", "gradient_checkpointing", "activation_checkpointing",
    "report_to", "logging_steps", "save_steps", "save_total_limit", "dataset_kwargs",
})
# generated from the distributed: block
DISTRIBUTED_TRL_FIELDS = ("deepspeed", "fsdp", "fsdp_config", "accelerator_config")


TB = TypeVar("TB", bound="TRLBlock")


class TRLMethod(Method[TB]):
    """A method on a TRL trainer: its config is TrainingArguments from the recipe + the method's fields + ``trl``."""

    def trl_config_class(self) -> type:
        """The TRL config class (imports TRL)."""
        raise NotImplementedError

    def trl_fields(self, recipe: Recipe) -> dict[str, Any]:
        """The TRL config fields the method sets from its block and the recipe (they are owned by tunelab)."""
        return {}

    def trl_passthrough(self, recipe: Recipe) -> dict[str, Any]:
        return dict(self.block(recipe).trl)

    def trl_config(self, recipe: Recipe, **extra: Any) -> Any:
        """The TRL config of a recipe (raises TypeError/ValueError on a bad ``method.trl``)."""
        kwargs = training_arguments(recipe)
        kwargs.update(self.trl_fields(recipe))
        kwargs.update(self.trl_passthrough(recipe))
        kwargs.update(extra)
        return self.trl_config_class()(**kwargs)

    def trl_problems(self, recipe: Recipe) -> list[Problem]:
        """Build the TRL config the way training will, and report what it rejects."""
        trl = self.trl_passthrough(recipe)
        owned = OWNED_TRL_FIELDS | set(self.trl_fields(recipe))
        problems = []
        for key in trl:
            if key in DISTRIBUTED_TRL_FIELDS:
                problems.append(Problem(f"method.trl.{key}", "is generated by tunelab from the distributed: block",
                                        "use distributed.strategy / offload / deepspeed_config instead"))
            elif key in owned:
                problems.append(Problem(f"method.trl.{key}", "is set by tunelab from the recipe",
                                        "use the recipe's own key (train.*, data.*, model.*, method.*) instead"))
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
