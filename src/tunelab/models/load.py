"""Load a model and tokenizer from a hub id, a local directory, a GGUF file or ``builtin:*``.

``builtin:tiny-*`` are random-init configs built here; ``builtin:smollm2-135m-instruct`` and any
``*.gguf`` path are GGUF files that transformers dequantizes (``tunelab.models.gguf``). Which of
these a path is, ``tunelab.models.ref.resolve_model`` says once; the functions here switch on its
``kind`` (each takes the ``ResolvedModel`` its caller has, or resolves the spec's path at its entry).

``trust_remote_code`` only ever comes from the recipe; weights load from safetensors only. A
local directory saved after MLA conversion (its config.json has an ``mla`` block) loads through
``tunelab.patches.mla.convert.load_mla_model``: the stock architecture with the MLA attention modules in
place, so a converted model (or a run trained from one) fine-tunes, evaluates and generates
like any other.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

from tunelab.data.templates import TemplateMismatch, apply_choice, choose_template, end_of_turn_ids
from tunelab.errors import Problem, UserError
from tunelab.models.builtin import builtin_config, builtin_model, builtin_tokenizer
from tunelab.models.ref import ResolvedModel, as_resolved, resolve_model
from tunelab.patches.mla.block import mla_attention_problem, mla_causal_only_problem, mla_unquantized_problem
from tunelab.specs import ModelSpec, QuantizationSpec, RecipeSpec

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def attn_problems(spec: "ModelSpec") -> list[Problem]:
    """Check the attention implementation can run here (before any weights load)."""
    if spec.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            return [Problem("model.attn_implementation", "flash_attention_2 needs the flash-attn package",
                            "pip install 'tunelab[gpu]' on a CUDA machine, or use sdpa")]
        import torch

        if not torch.cuda.is_available():
            return [Problem("model.attn_implementation", "flash_attention_2 needs a CUDA GPU", "use sdpa on CPU")]
    return []


def recipe_models(recipe: "RecipeSpec") -> dict[str, ResolvedModel]:
    """Every model a recipe names, resolved once, by the recipe key that names it: ``model.path`` first, then the
    ones its method names (references, reward models, critics)."""
    models = {"model.path": resolve_model(recipe.model.path, recipe.model.revision, "model.path")}
    for ref in recipe.method.model_refs():
        if ref.path and ref.key not in models:
            models[ref.key] = resolve_model(ref.path, key=ref.key)
    return models


def missing_models(models: dict[str, ResolvedModel]) -> list[Problem]:
    """The models of a recipe that can only be local paths and are not there (a chain's later step, or a typo)."""
    return [m.missing for m in models.values() if m.missing is not None]


# what to say of an MLA model named where a method needs a score model
_SCORE_REF_FIX = {"reward model": "use a reward model run", "critic": "use a reward model run or an unconverted model"}


def mla_checkpoint_problems(recipe: "RecipeSpec", models: dict[str, ResolvedModel]) -> list[Problem]:
    """A recipe whose models are MLA-converted directories must load them the ways MLA supports (no weights read).

    ``models``: the recipe's models as ``recipe_models`` resolved them.
    """
    problems = []
    path = recipe.model.path
    if models["model.path"].kind == "mla":
        if problem := mla_attention_problem(recipe.model.attn_implementation, f"{path} is an MLA model"):
            problems.append(problem)
        peft_method = recipe.peft.method if recipe.peft is not None else None
        if recipe.model.quantization is not None or peft_method == "qlora":
            problems.append(mla_unquantized_problem("peft.method" if peft_method == "qlora" else "model.quantization",
                                                    path))
        if recipe.method.model_head != "causal":
            problems.append(mla_causal_only_problem("model.path", path, f"; method {recipe.method.name} needs a "
                                                    "sequence classifier", "start the reward model from the "
                                                    "unconverted model"))
    for ref in recipe.method.model_refs():
        if ref.head == "score" and ref.key in models and models[ref.key].kind == "mla":
            problems.append(mla_causal_only_problem(ref.key, ref.path, f", not a {ref.role}",
                                                    _SCORE_REF_FIX.get(ref.role, "use an unconverted model")))
    return problems


def load_mla_checkpoint(path: str | Path, dtype: Any = None, attn_implementation: str = "sdpa") -> Any:
    """A causal LM saved after MLA conversion, in ``dtype`` (default: as saved), named by its path (PEFT reads it)."""
    from tunelab.patches.mla.convert import load_mla_model

    if problem := mla_attention_problem(attn_implementation, f"{path} is an MLA model"):
        raise UserError(problem)
    model: Any = load_mla_model(path, attn_implementation=attn_implementation)
    if dtype is not None:
        model = model.to(dtype)
    # from_config leaves these empty; a PEFT adapter records its base from them
    model.name_or_path = str(path)
    model.config.name_or_path = str(path)
    return model


def load_config(spec: "ModelSpec", source: ResolvedModel | None = None) -> Any | None:
    """The model's config without its weights (builtin, local dir, or a hub id in the local cache); None if unknown.

    ``source``: ``spec.path`` already resolved (else it is resolved here).
    """
    source = source or resolve_model(spec.path, spec.revision)
    if source.kind == "builtin":
        return builtin_config(source.name)
    if source.problem is not None:
        return None  # not trained yet (a chain), or a wheel not installed: said elsewhere
    from transformers import AutoConfig

    try:
        path, extra = source.pretrained_args()
        return AutoConfig.from_pretrained(path, revision=source.revision, trust_remote_code=spec.trust_remote_code,
                                          **extra)
    except (OSError, ValueError, UserError):
        return None  # not trained yet (a chain), or a hub id offline: noted elsewhere


def resolve_dtype(spec: "ModelSpec", full_finetune: bool) -> Any:
    """auto: bf16 weights on a bf16 GPU for PEFT (fp32 master weights for full fine-tuning), fp32 on CPU."""
    import torch

    if spec.dtype != "auto":
        return getattr(torch, DTYPES[spec.dtype])
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not full_finetune:
        return torch.bfloat16
    return torch.float32


def load_tokenizer(spec: "ModelSpec", source: ResolvedModel | None = None) -> Any:
    """The tokenizer, with a pad token (see ``ensure_pad_token``) and the run's chat template applied.

    The template is ``model.chat_template`` resolved by ``tunelab.data.templates.choose_template``;
    the tokenizer then renders (and is saved) with it. ``source``: ``spec.path`` already resolved.
    """
    source = source or resolve_model(spec.path, spec.revision)
    tok = builtin_tokenizer() if source.kind == "builtin" else pretrained_tokenizer(source, spec.trust_remote_code)
    try:
        apply_choice(tok, choose_template(spec, tok))
    except TemplateMismatch:
        pass  # no template at all: only an error if a conversation needs one (said per row, and at validate)
    return tok


def pretrained_tokenizer(model: ResolvedModel | str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a hub id, a directory or a GGUF file (its vocabulary and chat template come from the file)."""
    from transformers import AutoTokenizer

    model = as_resolved(model, "model.path")
    if model.is_gguf:
        model.check()
    where, extra = model.pretrained_args()
    try:
        tok = AutoTokenizer.from_pretrained(where, revision=model.revision, trust_remote_code=trust_remote_code,
                                            **extra)
    except (OSError, ValueError) as exc:
        raise UserError(Problem(model.key, f"cannot load tokenizer from {model.given!r}: {exc}"[:500],
                                "check the hub id, directory or file (offline machines need a local copy)")) from None
    return ensure_pad_token(tok)


def ensure_pad_token(tok: Any) -> Any:
    """Give the tokenizer a pad token that is not its end-of-turn/eos token when it has a spare one.

    Many chat models ship ``pad = eos`` (SmolLM2: ``<|im_end|>``). Labels are built by tunelab and
    padded with -100, so the loss is right either way; but a reward model finds a row's last token
    as "the last non-pad token", and generation stops at eos, so a distinct pad is safer. Only an
    existing token is used (the vocabulary is never resized).
    """
    eos = tok.eos_token
    if tok.pad_token is not None and tok.pad_token != eos:
        return tok
    vocab = tok.get_vocab()
    for candidate in ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]"):
        if candidate in vocab and candidate != eos:
            tok.pad_token = candidate
            return tok
    if tok.pad_token is None:
        tok.pad_token = eos
    return tok


def bnb_config(q: "QuantizationSpec") -> Any:
    """A BitsAndBytesConfig from a recipe quantization block."""
    import torch
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(Problem("peft.quantization", "quantization needs bitsandbytes", "pip install 'tunelab[quant]'"))
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
    )


def load_model(spec: "ModelSpec", quantization: "QuantizationSpec | None" = None, full_finetune: bool = True,
               head: str = "causal", source: ResolvedModel | None = None) -> Any:
    """The causal LM of ``spec`` (quantized when a quantization block is given).

    ``head="score"`` loads the same checkpoint as a one-output sequence classifier (a reward
    model): the body's weights, a new score head unless the checkpoint already has one.
    ``source``: ``spec.path`` already resolved (validate's); else it is resolved here.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    source = source or resolve_model(spec.path, spec.revision)
    dtype = resolve_dtype(spec, full_finetune)
    auto: Any = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    if source.kind == "builtin":
        built = builtin_model(source.name, dtype=dtype, attn_implementation=spec.attn_implementation, head=head)
        if quantization is None:
            return built
        # quantization happens at load time: go through a saved copy like any local checkpoint
        tmp = Path(tempfile.mkdtemp(prefix="tunelab-builtin-"))
        built.save_pretrained(tmp)
        path, revision, remote = str(tmp), None, False
    elif source.is_gguf:
        return load_gguf_model(source, auto, dtype, spec.attn_implementation, quantization, head)
    elif source.kind == "mla":
        if quantization is not None:
            raise UserError(mla_unquantized_problem("model.quantization", source.path))
        if head != "causal":
            raise UserError(mla_causal_only_problem(source.key, source.path, fix="start a reward model or critic from "
                                                    "the unconverted model"))
        return load_mla_checkpoint(source.path, dtype, spec.attn_implementation)
    else:  # a model directory, an adapter (transformers loads its base), a hub id
        source.check()  # not there, or no model in it
        path, revision, remote = source.path, source.revision, spec.trust_remote_code
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation=spec.attn_implementation,
                                  trust_remote_code=remote, use_safetensors=True)
    if revision:
        kwargs["revision"] = revision
    if quantization is not None:
        kwargs["quantization_config"] = bnb_config(quantization)
    if head == "score":
        kwargs["num_labels"] = 1
    try:
        return auto.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise UserError(Problem(source.key, f"cannot load model from {spec.path!r}: {exc}"[:500],
                                "check the hub id or directory; only safetensors weights are loaded")) from None


def load_gguf_model(model: ResolvedModel, auto: Any, dtype: Any, attn_implementation: str = "sdpa",
                    quantization: "QuantizationSpec | None" = None, head: str = "causal") -> Any:
    """A model from a GGUF file, dequantized to ``dtype``; named by its path (a real built-in: ``builtin:NAME``) so
    an adapter records it as its base.

    With a quantization block (QLoRA) the dequantized weights go through a saved safetensors copy
    first: bitsandbytes quantizes at load time, from ordinary weights.
    """
    model.check()  # the GGUF file there, its header one transformers reads
    where, extra = model.pretrained_args()
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation=attn_implementation, **extra)
    if head == "score":
        kwargs["num_labels"] = 1
    if quantization is not None:
        tmp = Path(tempfile.mkdtemp(prefix="tunelab-gguf-"))
        auto.from_pretrained(where, **kwargs).save_pretrained(tmp)
        kwargs = dict(dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True,
                      quantization_config=bnb_config(quantization))
        if head == "score":
            kwargs["num_labels"] = 1
        net = auto.from_pretrained(str(tmp), **kwargs)
    else:
        net = auto.from_pretrained(where, **kwargs)
    forget_gguf_quantization(net)
    name = model.given if model.kind == "real_builtin" else str(Path(where, extra["gguf_file"]))
    net.name_or_path = name
    net.config.name_or_path = name
    return net


def forget_gguf_quantization(model: Any) -> None:
    """A GGUF-loaded model is dequantized floats, but transformers still tags it "quantized: GGUF".

    The tag makes the Trainer refuse to train it, and would be saved into config.json (a model
    that claims a GGUF quantization it does not have). The weights are ordinary tensors: drop it.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)).lower() == "gguf":
        model.hf_quantizer = None
        if "is_quantized" in vars(model):
            model.is_quantized = False
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None and hasattr(cfg, "quantization_config"):
                delattr(cfg, "quantization_config")


def frozen_reference(spec: "ModelSpec", model: Any, path: str | None, copy_start: bool) -> Any | None:
    """The frozen reference model of DPO and PPO: ``path`` loaded like ``spec`` (full precision, no quantization),
    else a copy of the starting ``model`` when ``copy_start``, else None (PEFT: the base with adapters disabled)."""
    import copy

    if path:
        ref = load_model(spec.model_copy(update={"path": path, "revision": None}), None, full_finetune=True)
    elif copy_start:
        ref = copy.deepcopy(model)
    else:
        return None
    ref.eval()
    ref.requires_grad_(False)
    return ref


def set_stop_tokens(model: Any, tokenizer: Any) -> list[int]:
    """Make the model's generation_config stop at the chat template's end-of-turn token (and eos).

    A fine-tuned chat model that never stops is the usual symptom of a generation_config whose
    eos is the tokenizer's document end while turns end with another token. Returns the ids set.
    """
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return []
    ids = end_of_turn_ids(tokenizer)
    old = gen.eos_token_id
    for i in [old] if isinstance(old, int) else list(old or []):
        if i not in ids:
            ids.append(i)
    if ids:
        gen.eos_token_id = ids if len(ids) > 1 else ids[0]
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    return ids
