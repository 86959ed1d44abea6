"""``tunelab plan``: how much GPU memory a recipe needs, what its data looks like, which strategy fits.

Nothing here loads weights. The model is built on the meta device from its config (shapes
only), so every parameter count is exact: the base model's, and the adapter's, counted from the
shapes of the linear layers LoRA targets. The memory estimate is per GPU, in five parts:

- **weights**: every parameter in the load dtype (``model.dtype``; ``auto`` resolves as on a
  bf16 GPU: bf16 under PEFT, fp32 master weights for full fine-tuning, as ``resolve_dtype``
  does there). QLoRA: the quantized linear layers at 4 bits (0.5 byte) plus their absmax
  constants, one per 64-weight block (fp32, or 8 bits plus one fp32 per 256 blocks with double
  quantization); 8-bit: 1 byte plus one fp32 per row. PEFT adapters are fp32 (PEFT upcasts them).
- **gradients**: trainable parameters only, in their dtype.
- **optimizer**: AdamW's two states per trainable parameter, in the parameter's dtype for torch's
  AdamW (none, ddp, fsdp2); DeepSpeed (zero0..3) keeps them in fp32 and adds an fp32 master copy:
  ZeRO-1..3 of every trainable parameter (it steps an fp32 clone of each rank's partition, also of fp32
  parameters), zero0 of 16-bit ones only. 8-bit AdamW: 1 byte per state; SGD/Adafactor: counted as none.
  DeepSpeed under bf16/fp16 holds the model itself (adapters too) in 16 bits: 2 + 2 + 12 bytes per
  trained parameter, the ZeRO paper's accounting; in fp32, 4 + 4 + 12 under ZeRO-1..3 and 4 + 4 + 8 under
  zero0; torch's autocast keeps fp32 weights (4 + 4 + 8).
- **activations**: the tensors autograd saves for backward, by sequence length S and micro batch
  B (the rows one forward sees). Counted from the tensors autograd saves in a Llama-style block
  with SDPA (listed with ``torch.autograd.graph.saved_tensors_hooks`` on the built-in tiny Llama,
  torch 2.13 / transformers 5.23), per token and per decoder layer, with h hidden, q = heads x
  head_dim, kv = kv_heads x head_dim, i intermediate, H heads; w the weights' dtype size (the
  residual stream's), a the matmul outputs' (2 under bf16/fp16 autocast, else w):

      each RMSNorm (2 per layer): its input in fp32 (4h: the fp32 residual or the norm's fp32 copy)
          + the fp32 rsqrt (4) + the normalised input (w·h, only when the norm's weight trains)
          + its output (a·h per following linear that keeps its input, i.e. whose weight or LoRA A
          trains: under autocast with fp32 weights each of q/k/v (gate/up) casts it to 16 bits
          separately and keeps its own copy, otherwise they share one)
      attention: rotated q, rotated k, v as SDPA keeps them, SDPA's output (a·(2q + 2kv)) + the fp32
          log-sum-exp (4H); RoPE's products keep only cos/sin, o_proj reads a view of SDPA's output
      MLP: gate, up, silu(gate) (3a·i) + silu(gate)·up (a·i, when down_proj keeps its input)
      LoRA: the r-wide output of each targeted A (a·r per target)
      autocast with fp32 weights: the 16-bit copy of every linear weight (a per parameter, not per
          token; with checkpointing the output layer's and one layer's at a time)

  Full fine-tune in fp32: 4·(6h + 2q + 2kv + 4i) + 4·(2 + H) bytes per layer per token. Outside
  the layers: input ids (8), RoPE cos and sin (2w·head_dim), the final norm, the labels (8) and
  the fp32 log-softmax that cross-entropy keeps (4V); SFT micro batches whose logits pass
  ``FUSED_HEAD_MIN_LOGIT_BYTES`` use TRL's chunked head and keep no logits. With gradient
  checkpointing a layer keeps only its input (w·h per token) and the backward pass recomputes
  one layer at a time: the layer inputs + one layer's activations + the outside part.
  Checked against measurement (tests/unit/plan/test_memory.py, table in docs/benchmarks.md) on the tiny
  Llama/Qwen2/Mistral in fp32 and under CPU bf16 autocast (the same casts as CUDA autocast); not on
  a GPU kernel's own buffers (no GPU in that session).
  Not counted: transient buffers (the logits' gradient, a reference model's forward), the CUDA
  context and allocator fragmentation: a strategy "fits" when its estimate is at most 90% of the
  GPU's memory.

Method extras: DPO keeps a frozen reference copy (none under PEFT: the reference is the base with
the adapter off; none with ``precompute_ref_log_probs``) and runs chosen and rejected together
(2B rows). Reward models score chosen and rejected (2B rows). GRPO keeps a reference when
``beta`` > 0 and not under PEFT; rows are prompt + completion. PPO: the policy, a critic (a
second copy of the model with a score head, trained: its own gradients and optimizer states;
under PEFT a second base with its own adapter), the reference (a frozen copy unless PEFT) and
each reward model (counted when its config can be read).

Strategies over N GPUs: none/ddp/zero0 hold everything on each GPU (DDP also keeps gradient
buckets, one more gradient-sized buffer); ZeRO-1 divides optimizer states (and master weights)
by N, ZeRO-2 also gradients, ZeRO-3 also parameters, plus the parameters of the largest layer
gathered for its forward; FSDP2 shards like ZeRO-3 (with torch's AdamW dtypes). CPU/NVMe offload
moves the optimizer states (and under ZeRO-3 the parameters) off the GPU; FSDP2's
``fsdp.cpu_offload`` moves parameters, gradients and optimizer states. PPO runs under none..zero2
only (its trainer refuses ZeRO-3). The cheapest strategy that fits is the first in the order
none (one GPU) / ddp, zero1, zero2, zero3, zero2+cpu, zero3+cpu whose estimate fits; when none
does, the plan says what gradient checkpointing and a smaller micro batch would need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tunelab.errors import Problem, UserError
from tunelab.methods import method_of
from tunelab.models.load import load_config
from tunelab.models.peft import quantization_of
from tunelab.models.ref import ResolvedModel
from tunelab.specs import LoraSpec, PrefixSpec, PromptSpec

if TYPE_CHECKING:
    from tunelab.recipe.schema import Recipe


GIB = 2**30
FIT_FRACTION = 0.9  # of the GPU's memory: room for the CUDA context, fragmentation, transient buffers
QUANT_BLOCK = 64  # bitsandbytes 4-bit block size (weights per absmax constant)
DOUBLE_QUANT_BLOCK = 256  # absmax constants per second-level fp32 constant
# cheapest first: more sharding costs communication, offload costs the CPU's optimizer step and PCIe traffic
STRATEGY_ORDER = ("ddp", "zero1", "zero2", "zero3", "zero2+cpu", "zero3+cpu")
ALL_STRATEGIES = ("none", "ddp", "zero0", "zero1", "zero2", "zero3", "fsdp2")


# ---------------------------------------------------------------- shapes and parameter counts

@dataclass
class ModelShape:
    """What the estimate needs to know about one model, read from a meta-device build."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int  # unique parameters (tied embeddings once)
    linears: list[tuple[str, int, int]]  # (module name, in_features, out_features) of every nn.Linear
    output_layer: str  # lm_head or score: never a LoRA target under all-linear, never quantized
    largest_layer: int  # parameters of the largest decoder layer (what ZeRO-3 gathers at once)
    embedding_params: int
    tied: bool


def model_shape(config: Any, head: str = "causal") -> ModelShape:
    """Build the model on the meta device (no memory, no weights) and read its shapes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = config.__class__.from_dict(config.to_dict())  # a copy: num_labels below must not leak
    auto: Any = AutoModelForCausalLM
    if head == "score":
        config.num_labels = 1
        auto = AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config)
    linears = [(n, m.in_features, m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    out = model.get_output_embeddings() if head == "causal" else getattr(model, "score", None)
    out_name = next((n for n, m in model.named_modules() if m is out), "lm_head")
    layers = getattr(getattr(model, "model", model), "layers", None) or []
    largest = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    emb = model.get_input_embeddings()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        hidden=config.hidden_size, intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
        layers=config.num_hidden_layers, heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
        vocab=config.vocab_size, params=sum(p.numel() for p in model.parameters()), linears=linears,
        output_layer=out_name, largest_layer=largest, embedding_params=emb.weight.numel() if emb is not None else 0,
        tied=bool(getattr(config, "tie_word_embeddings", False)) and head == "causal",
    )


def lora_targets(shape: ModelShape, target_modules: Any) -> list[tuple[str, int, int]]:
    """The linear layers a LoRA config wraps: PEFT's rules (all-linear: every linear but the output layer;
    a list: a module whose name is, or ends with ``.``, one of the entries)."""
    if target_modules == "all-linear":
        return [t for t in shape.linears if t[0] != shape.output_layer]
    keys = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    return [t for t in shape.linears if any(t[0] == k or t[0].endswith("." + k) for k in keys)]


def adapter_params(shape: ModelShape, peft: "LoraSpec | PrefixSpec | PromptSpec | None") -> int:
    """Trainable parameters a ``peft:`` block adds, counted from shapes: LoRA r(in + out) per target
    (+ out for DoRA's magnitude); prefix: 2 x kv width per layer per virtual token; prompt: h per token."""
    if peft is None:
        return 0
    if isinstance(peft, LoraSpec):
        targets = lora_targets(shape, peft.target_modules)
        n = sum(peft.r * (i + o) + (o if peft.method == "dora" else 0) for _, i, o in targets)
        if peft.bias != "none":
            n += sum(o for _, _, o in targets)
        return n
    if isinstance(peft, PrefixSpec):
        return peft.num_virtual_tokens * shape.layers * 2 * shape.kv_heads * shape.head_dim
    return peft.num_virtual_tokens * shape.hidden


# ---------------------------------------------------------------- the estimate

@dataclass
class Component:
    """One model's share of the memory, before any partitioning (bytes)."""

    name: str
    weights: float
    grads: float
    optimizer: float  # states, and DeepSpeed's fp32 master copy
    activations: float


@dataclass
class Estimate:
    """The per-GPU memory of one strategy (bytes)."""

    strategy: str
    gpus: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    extra: float = 0.0  # DDP buckets, ZeRO-3's gathered layer
    offloaded: float = 0.0  # moved to CPU/NVMe

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.extra


@dataclass
class Plan:
    """Everything ``tunelab plan`` prints."""

    model_line: str
    components: list[Component]
    estimates: list[Estimate]
    fits: str | None
    gpu_memory: float
    gpus: int
    notes: list[str] = field(default_factory=list)
    seq_len: int = 0
    micro_batch: int = 0
    suggestions: list[str] = field(default_factory=list)
    current: str = "none"  # the recipe's own distributed strategy (+cpu for any offload)


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def weight_dtype(model_spec: Any, full_finetune: bool, gpu: bool = True) -> str:
    """The load dtype: ``resolve_dtype``'s rule, with ``auto`` resolved for the target (a bf16 GPU by default)."""
    if model_spec.dtype != "auto":
        return model_spec.dtype
    return "bfloat16" if gpu and not full_finetune else "float32"


def precision(train: Any, gpu: bool = True) -> str:
    """``train.precision`` with ``auto`` resolved for the target: bf16 on a GPU, fp32 on a CPU."""
    return train.precision if train.precision != "auto" else ("bf16" if gpu else "fp32")


def activation_bytes_per_token(shape: ModelShape, wbytes: int, act: int, checkpointing: bool, logits: bool = True,
                               peft: "LoraSpec | PrefixSpec | PromptSpec | None" = None) -> tuple[float, float]:
    """(bytes per token held through the backward pass, bytes per token of the one layer recomputed at a time).

    The formula and where it comes from are in the module docstring. ``wbytes``: the weights' (and
    so the residual stream's) dtype size; ``act``: the matmul outputs' (2 under autocast).
    """
    h, i, hh = shape.hidden, shape.intermediate, shape.heads
    q, kv = hh * shape.head_dim, shape.kv_heads * shape.head_dim
    full = peft is None
    targets: set[str] = set()
    r = per_layer_targets = 0
    if isinstance(peft, LoraSpec):
        r = peft.r
        targets = {name.rsplit(".", 1)[-1] for name, _, _ in lora_targets(shape, peft.target_modules)
                   if ".layers." in name}
        per_layer_targets = sum(1 for name, _, _ in lora_targets(shape, peft.target_modules) if ".layers.0." in name)

    def saves_input(*names: str) -> bool:  # a linear keeps its input when its weight or its LoRA A trains
        return full or any(n in targets for n in names)

    def keepers(*names: str) -> int:
        # autocast casts a norm's fp32 output to bf16 once per linear that reads it (only weights are
        # cached), so with fp32 weights each keeping linear holds its own copy; otherwise they share one
        n = sum(1 for x in names if full or x in targets)
        return n if act < wbytes else min(n, 1)

    def norm(copies: int, trainable: bool) -> float:
        # x in fp32 (the residual, or the norm's fp32 copy of it) and the fp32 rsqrt always; the
        # normalised x when the norm's weight trains; the output per linear that keeps it
        return 4 * h + 4 + (wbytes * h if trainable else 0) + act * h * copies

    attn = norm(keepers("q_proj", "k_proj", "v_proj"), full) + act * (2 * q + 2 * kv) + 4 * hh
    mlp = norm(keepers("gate_proj", "up_proj"), full) + act * (3 * i + (i if saves_input("down_proj") else 0))
    layer = attn + mlp + act * r * per_layer_targets
    outside = 8 + 2 * shape.head_dim * wbytes + norm(1 if full else 0, full) + 8 + (4 * shape.vocab if logits else 0)
    if checkpointing:
        return outside + shape.layers * h * wbytes, layer
    return outside + shape.layers * layer, 0.0


def weight_cast_bytes(shape: ModelShape, wbytes: int, act: int, peft: "LoraSpec | PrefixSpec | PromptSpec | None", checkpointing: bool) -> tuple[float, float]:
    """(held, recomputed) bytes of autocast's 16-bit copies of fp32 linear weights, kept for backward.

    Under autocast with fp32 weights every linear multiplies with a bf16/fp16 copy of its weight
    that autograd keeps (it is needed for the input's gradient, trained or frozen). With gradient
    checkpointing only the output layer's copy is held; one layer's copies come back per recompute.
    """
    if act >= wbytes:
        return 0.0, 0.0
    out = sum(i * o for n, i, o in shape.linears if n == shape.output_layer)
    layer0 = sum(i * o for n, i, o in shape.linears if ".layers.0." in n)
    adapter = adapter_params(shape, peft) if peft is not None and peft.method in ("lora", "dora", "qlora") else 0
    total = sum(i * o for _, i, o in shape.linears) + adapter
    if checkpointing:
        return float(act * out), float(act * (layer0 + adapter / max(1, shape.layers)))
    return float(act * total), 0.0


def _optim_state_bytes(optim: str, trainable_dtype_bytes: int, zero: int | None) -> float:
    """Bytes of optimizer state per trainable parameter (master copy included); ``zero``: the ZeRO stage, None
    without DeepSpeed.

    ZeRO-1..3 step an fp32 clone of each rank's partition of the parameters, also when the parameters are
    fp32 themselves (measured: tests/integration/test_plan_zero_shares.py); ZeRO-0 keeps a master copy
    only of 16-bit parameters (its bf16/fp16 optimizer wrappers) and steps fp32 ones in place.
    """
    name = optim.lower()
    if "sgd" in name or "adafactor" in name:
        return 0.0
    per_state = 1 if "8bit" in name else (4 if zero is not None else trainable_dtype_bytes)
    master = 4 if zero is not None and (trainable_dtype_bytes < 4 or zero >= 1) else 0
    return 2 * per_state + master


def model_component(name: str, shape: ModelShape, wbytes: int, peft: "LoraSpec | PrefixSpec | PromptSpec | None", quant: Any, trainable: bool,
                    optim: str, zero: int | None, tokens: float, act: int, ckpt: bool,
                    logits: bool = True, abytes: int = 4) -> tuple[Component, float]:
    """One model's weights, gradients, optimizer states and activations; (component, recompute peak).

    ``zero``: the DeepSpeed ZeRO stage, None for torch's optimizer (none, ddp, fsdp2). ``abytes``: the
    adapter's dtype size (PEFT keeps adapters in fp32; DeepSpeed casts them with the model).
    """
    weights = float(shape.params * wbytes)
    if quant is not None:
        quantized = sum(i * o for n, i, o in shape.linears if n != shape.output_layer)
        if quant.bits == 4:
            blocks = quantized / QUANT_BLOCK
            consts = blocks * 1 + blocks / DOUBLE_QUANT_BLOCK * 4 if quant.double_quant else blocks * 4
            qbytes = quantized * 0.5 + consts
        else:
            qbytes = quantized * 1.0 + sum(o for n, _, o in shape.linears if n != shape.output_layer) * 4
        weights += qbytes - quantized * wbytes
    n_adapter = adapter_params(shape, peft)
    weights += n_adapter * abytes
    if not trainable:
        return Component(name, weights, 0.0, 0.0, 0.0), 0.0
    if peft is None:
        n_train, tbytes = shape.params, wbytes
    else:
        n_train, tbytes = n_adapter, abytes
    held, recompute = activation_bytes_per_token(shape, wbytes, act, ckpt, logits, peft)
    casts, casts_recompute = weight_cast_bytes(shape, wbytes, act, peft, ckpt)
    comp = Component(name, weights, float(n_train * tbytes), n_train * _optim_state_bytes(optim, tbytes, zero),
                     held * tokens + casts)
    return comp, recompute * tokens + casts_recompute


def partition(components: list[Component], strategy: str, offload: str, gpus: int,
              largest_layer_bytes: float, recompute: float) -> Estimate:
    """Divide the components the way a strategy divides them over ``gpus`` (see the module docstring)."""
    weights = sum(c.weights for c in components)
    grads = sum(c.grads for c in components)
    opt = sum(c.optimizer for c in components)
    act = sum(c.activations for c in components) + recompute
    n = max(1, gpus)
    stage = {"zero1": 1, "zero2": 2, "zero3": 3, "fsdp2": 3}.get(strategy, 0)
    extra, offloaded = 0.0, 0.0
    if strategy == "ddp" and n > 1:
        extra += grads  # DDP's gradient buckets (gradient_as_bucket_view=False, torch's default)
    if stage >= 1:
        opt /= n
    if stage >= 2:
        grads /= n
    if stage >= 3:
        # frozen copies (a reference model) are sharded too under ZeRO-3/FSDP
        weights = weights / n
        extra += largest_layer_bytes
    if offload in ("cpu", "nvme"):
        offloaded += opt
        opt = 0.0
        if strategy == "fsdp2":  # fsdp.cpu_offload: parameters, gradients and optimizer states on the CPU
            offloaded += grads
            grads = 0.0
        if stage >= 3:
            offloaded += weights
            weights = 0.0
    label = strategy + (f"+{offload}" if offload not in ("none", None) else "")
    return Estimate(label, n, weights, grads, opt, act, extra, offloaded)


def parse_memory(text: str) -> float:
    """``80GB``, ``80GiB``, ``24G``, ``81920MB`` -> bytes (GB and GiB both mean 2**30: GPUs are sold that way)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UserError(Problem("--gpu-memory", f"cannot read {text!r}", "write e.g. 80GB, 24GiB or 40960MB"))
    scale = {"": GIB, "K": 2**10, "M": 2**20, "G": GIB, "T": 2**40}[m.group(2).upper()]
    return float(m.group(1)) * scale


def estimate(recipe: "Recipe", gpus: int = 1, gpu_memory: float = 80 * GIB, seq_len: int | None = None,
             gpu: bool = True, config: Any = None, source: ResolvedModel | None = None) -> Plan:
    """The per-GPU memory of every strategy for ``recipe`` and the cheapest that fits (no weights loaded).

    ``config``: the model's config when validate read it; ``source``: ``model.path`` as validate resolved it.
    """
    config = config if config is not None else load_config(recipe.model, source)
    if config is None:
        raise UserError(Problem("model.path", f"the config of {recipe.model.path!r} is not available here "
                                "(a hub id not in the local cache offline, or a run that has not been trained yet)",
                                "download the model once (huggingface-cli download ID config.json), or point "
                                "model.path at a directory with a config.json"))
    method = method_of(recipe.method)
    head = method.model_head
    peft = recipe.peft
    full = peft is None
    wdtype = weight_dtype(recipe.model, full, gpu)
    wbytes = DTYPE_BYTES[wdtype]
    prec = precision(recipe.train, gpu)
    mixed = prec in ("bf16", "fp16")
    act = 2 if mixed else wbytes
    ckpt = recipe.model.gradient_checkpointing
    quant = quantization_of(recipe)
    shape = model_shape(config, head)
    terms = method.memory_terms(recipe, seq_len or recipe.data.max_length, shape.vocab)
    b, s, notes = terms.rows, terms.tokens, list(terms.notes)
    tokens = float(b * s)
    dist = getattr(recipe, "distributed", None)
    optim = recipe.train.optim

    reward_configs: dict[str, Any] = {}  # frozen reward models (ppo), read once
    for path in terms.reward_models:
        reward_configs[path] = load_config(recipe.model.model_copy(update={"path": path, "revision": None}))
        if reward_configs[path] is None:
            notes.append(f"reward model {path}: config not readable here, not counted")

    def build(zero: int | None, ckpt_: bool = ckpt, tokens_: float = tokens) -> tuple[list[Component], float]:
        comps: list[Component] = []
        # DeepSpeed under bf16/fp16 holds the model in 16 bits (adapters too) and the fp32 master copy in the optimizer
        wb, ab = (2, 2) if zero is not None and mixed else (wbytes, 4)
        policy, rec = model_component(terms.trained, shape, wb, peft, quant, True, optim, zero, tokens_, act,
                                      ckpt_, terms.full_logits, ab)
        comps.append(policy)
        if terms.reference:
            ref_bytes = min(wb, DTYPE_BYTES[weight_dtype(recipe.model, True, gpu)])
            comps.append(model_component("reference", shape, ref_bytes, None, None, False, optim, zero, 0,
                                         act, ckpt_)[0])
        if terms.critic:
            critic_shape = model_shape(config, "score")
            critic, rec_c = model_component("critic", critic_shape, wb, peft, quant, True, optim, zero,
                                            tokens_, act, ckpt_, logits=False, abytes=ab)
            comps.append(critic)
            rec += rec_c
        for path in terms.reward_models:
            rconf = reward_configs.get(path)
            if rconf is not None:
                comps.append(model_component(f"reward model {path}", model_shape(rconf, "score"), wb, None,
                                             None, False, optim, zero, 0, act, ckpt_)[0])
        return comps, rec

    largest = float(shape.largest_layer * (2 if mixed else wbytes))  # ZeRO-3/FSDP2 gather in the compute dtype
    table: list[Estimate] = []
    for strategy in ALL_STRATEGIES:
        comps, rec = build(int(strategy[4]) if strategy.startswith("zero") else None)
        n = 1 if strategy == "none" else gpus
        table.append(partition(comps, strategy, "none", n, largest, rec))
        if strategy in ("zero2", "zero3", "fsdp2"):
            table.append(partition(comps, strategy, "cpu", n, largest, rec))
    if method.refused_strategies:
        table = [e for e in table if e.strategy.split("+")[0] not in method.refused_strategies]
        notes.append(f"{method.name}: {' and '.join(method.refused_strategies)} are not supported "
                     "(rollouts need the whole policy on every rank)")
    components, _ = build(None)
    limit = gpu_memory * FIT_FRACTION
    by_name = {e.strategy: e for e in table}
    order = ("none",) + STRATEGY_ORDER[1:] if gpus == 1 else STRATEGY_ORDER
    fits = next((name for name in order if name in by_name and by_name[name].total <= limit), None)
    suggestions: list[str] = []
    last = next(x for x in ("zero3", "zero2", "zero1") if x not in method.refused_strategies)
    if fits is None:
        comps, rec = build(int(last[4]), True)
        z3 = partition(comps, last, "cpu", gpus, largest, rec)
        if not ckpt and z3.total <= limit:
            suggestions.append(f"turn on model.gradient_checkpointing: {last}+cpu then needs {z3.total / GIB:.2f} GiB")
        for mb in (recipe.train.batch_size // 2, recipe.train.batch_size // 4, 1):
            if mb < 1 or mb >= recipe.train.batch_size:
                continue
            comps, rec = build(int(last[4]), True, tokens * mb / recipe.train.batch_size)
            z3 = partition(comps, last, "cpu", gpus, largest, rec)
            if z3.total <= limit:
                suggestions.append(f"gradient checkpointing and train.batch_size={mb} (raise train.grad_accum to "
                                   f"keep the global batch): {last}+cpu then needs {z3.total / GIB:.2f} GiB")
                break
        if not suggestions:
            suggestions.append("nothing fits even with checkpointing and micro batch 1: more GPUs, a GPU with more "
                               "memory, a shorter data.max_length, or PEFT (lora/qlora)")
    trainable = adapter_params(shape, peft) if peft is not None else shape.params
    quant_txt = f", base quantized to {quant.bits} bits" if quant is not None else ""
    model_line = (f"{recipe.model.path}: {shape.params / 1e6:.2f}M parameters ({shape.layers} layers, hidden "
                  f"{shape.hidden}, vocab {shape.vocab}), {wdtype} weights{quant_txt}; trainable "
                  f"{trainable / 1e6:.3f}M ({'full fine-tune' if peft is None else peft.method}); precision {prec}; "
                  f"micro batch {b} x {s} tokens; gradient checkpointing {'on' if ckpt else 'off'}; optimizer {optim}")
    strategy = getattr(dist, "strategy", "none") if dist is not None else "none"
    offload = getattr(dist, "offload", "none") if dist is not None else "none"
    if strategy == "fsdp2" and getattr(getattr(dist, "fsdp", None), "cpu_offload", False):
        offload = "cpu"
    current = strategy + ("+cpu" if offload in ("cpu", "nvme") else "")
    return Plan(model_line, components, table, fits, gpu_memory, gpus, notes, s, b, suggestions, current)


# ---------------------------------------------------------------- data: lengths and the first example
