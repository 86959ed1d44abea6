"""Load a model and tokenizer from a hub id, a local directory, a GGUF file or ``builtin:*``.

``builtin:tiny-*`` are random-init configs built here; ``builtin:smollm2-135m-instruct`` and any
``*.gguf`` path are GGUF files that transformers dequantizes (``tunelab.models.gguf``).

``trust_remote_code`` only ever comes from the recipe; weights load from safetensors only. A
local directory saved after MLA conversion (its config.json has an ``mla`` block) loads through
``tunelab.patches.mla.convert.load_mla_model``: the stock architecture with the MLA attention modules in
place, so a converted model (or a run trained from one) fine-tunes, evaluates and generates
like any other.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

from tunelab.data.templates import TemplateMismatch, apply_choice, choose_template, end_of_turn_ids
from tunelab.errors import Problem, UserError
from tunelab.models.builtin import BUILTIN_MODELS, builtin_config, builtin_model, builtin_tokenizer
from tunelab.models.gguf import gguf_error, is_gguf_path, pretrained_kwargs
from tunelab.patches.mla.block import mla_attention_problem, mla_causal_only_problem, mla_unquantized_problem
from tunelab.specs import ModelSpec, QuantizationSpec, RecipeSpec


def is_tiny_builtin(path: str) -> bool:
    """``builtin:tiny-*``: a random-init model built from a config here (no file behind it)."""
    return path.startswith("builtin:") and path[len("builtin:"):] in BUILTIN_MODELS

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


def missing_local_model(path: str, key: str = "model.path") -> Problem | None:
    """A path that can only be a local directory (not ``org/name``) and does not exist."""
    if path.startswith("builtin:"):
        return None
    if is_gguf_path(path) and not Path(path).expanduser().is_file():
        return Problem(key, f"{path} does not exist", "check the path to the .gguf file")
    local = path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path
    p = Path(path).expanduser()
    if not local or p.exists():
        return None
    hint = "check the path"
    if p.name == "final":
        hint = f"it is a run's output: train the run that writes {p.parent} first"
    return Problem(key, f"{path} does not exist", hint)


def missing_models(recipe: "RecipeSpec") -> list[Problem]:
    """Model paths of a recipe (the model and the ones its method names) that can only be local directories
    and do not exist."""
    paths = [("model.path", recipe.model.path)] + [(ref.key, ref.path) for ref in recipe.method.model_refs()]
    return [m for key, path in paths if path and (m := missing_local_model(path, key))]


def mla_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a local model directory converted to MLA (an ``mla`` block in its config.json)."""
    config = Path(str(path)).expanduser() / "config.json"
    if str(path).startswith("builtin:") or is_gguf_path(str(path)) or not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("mla"))
    except (OSError, ValueError, AttributeError):
        return False  # unreadable: the ordinary loader reports it


# what to say of an MLA model named where a method needs a score model
_SCORE_REF_FIX = {"reward model": "use a reward model run", "critic": "use a reward model run or an unconverted model"}


def mla_checkpoint_problems(recipe: "RecipeSpec") -> list[Problem]:
    """A recipe whose models are MLA-converted directories must load them the ways MLA supports (no weights read)."""
    problems = []
    path = recipe.model.path
    if mla_checkpoint(path):
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
        if ref.head == "score" and mla_checkpoint(ref.path):
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


def load_config(spec: "ModelSpec") -> Any | None:
    """The model's config without its weights (builtin, local dir, or a hub id in the local cache); None if unknown."""
    if is_tiny_builtin(spec.path):
        return builtin_config(spec.path[len("builtin:") :])
    from transformers import AutoConfig

    try:
        path, extra = pretrained_kwargs(spec.path)
        return AutoConfig.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
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


def load_tokenizer(spec: "ModelSpec") -> Any:
    """The tokenizer, with a pad token (see ``ensure_pad_token``) and the run's chat template applied.

    The template is ``model.chat_template`` resolved by ``tunelab.data.templates.choose_template``;
    the tokenizer then renders (and is saved) with it.
    """
    tok = builtin_tokenizer() if is_tiny_builtin(spec.path) else pretrained_tokenizer(spec.path, spec.revision,
                                                                                        spec.trust_remote_code)
    try:
        apply_choice(tok, choose_template(spec, tok))
    except TemplateMismatch:
        pass  # no template at all: only an error if a conversation needs one (said per row, and at validate)
    return tok


def pretrained_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False,
                         key: str = "model.path") -> Any:
    """The tokenizer of a hub id, a directory or a GGUF file (its vocabulary and chat template come from the file)."""
    from transformers import AutoTokenizer

    if is_gguf_path(path):
        gguf_error(path, key)
    where, extra = pretrained_kwargs(path, key)
    try:
        tok = AutoTokenizer.from_pretrained(where, revision=revision, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as exc:
        raise UserError(Problem(key, f"cannot load tokenizer from {path!r}: {exc}"[:500],
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


def load_model(spec: "ModelSpec", quantization: "QuantizationSpec | None" = None, full_finetune: bool = True, head: str = "causal") -> Any:
    """The causal LM of ``spec`` (quantized when a quantization block is given).

    ``head="score"`` loads the same checkpoint as a one-output sequence classifier (a reward
    model): the body's weights, a new score head unless the checkpoint already has one.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = resolve_dtype(spec, full_finetune)
    auto: Any = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    if is_tiny_builtin(spec.path):
        name = spec.path[len("builtin:") :]
        model = builtin_model(name, dtype=dtype, attn_implementation=spec.attn_implementation, head=head)
        if quantization is None:
            return model
        # quantization happens at load time: go through a saved copy like any local checkpoint
        tmp = Path(tempfile.mkdtemp(prefix="tunelab-builtin-"))
        model.save_pretrained(tmp)
        path, revision, remote = str(tmp), None, False
    else:
        path, revision, remote = spec.path, spec.revision, spec.trust_remote_code
    if is_gguf_path(path):
        return load_gguf_model(path, auto, dtype, spec.attn_implementation, quantization, head)
    if mla_checkpoint(path):
        if quantization is not None:
            raise UserError(mla_unquantized_problem("model.quantization", path))
        if head != "causal":
            raise UserError(mla_causal_only_problem("model.path", path, fix="start a reward model or critic from the "
                                                    "unconverted model"))
        return load_mla_checkpoint(path, dtype, spec.attn_implementation)
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
        raise UserError(Problem("model.path", f"cannot load model from {spec.path!r}: {exc}"[:500],
                                "check the hub id or directory; only safetensors weights are loaded")) from None


def load_gguf_model(path: str, auto: Any, dtype: Any, attn_implementation: str = "sdpa", quantization: "QuantizationSpec | None" = None,
                    head: str = "causal", key: str = "model.path") -> Any:
    """A model from a GGUF file, dequantized to ``dtype``; named by ``path`` so an adapter records it as its base.

    With a quantization block (QLoRA) the dequantized weights go through a saved safetensors copy
    first: bitsandbytes quantizes at load time, from ordinary weights.
    """
    gguf_error(path, key)
    where, extra = pretrained_kwargs(path, key)
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
        model = auto.from_pretrained(str(tmp), **kwargs)
    else:
        model = auto.from_pretrained(where, **kwargs)
    forget_gguf_quantization(model)
    name = path if path.startswith("builtin:") else str(Path(path).expanduser().resolve())
    model.name_or_path = name
    model.config.name_or_path = name
    return model


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
