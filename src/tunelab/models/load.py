"""Load a model and tokenizer from a hub id, a local directory or ``builtin:tiny-*``.

``trust_remote_code`` only ever comes from the recipe; weights load from safetensors only. A
local directory saved after MLA conversion (its config.json has an ``mla`` block) loads through
``tunelab.patches.mla.load_mla_model``: the stock architecture with the MLA attention modules in
place, so a converted model (or a run trained from one) fine-tunes, evaluates and generates
like any other.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

from tunelab.errors import Problem, UserError
from tunelab.models.builtin import builtin_model, builtin_tokenizer

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def attn_problems(spec: Any) -> list[Problem]:
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
    local = path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path
    p = Path(path).expanduser()
    if not local or p.exists():
        return None
    hint = "check the path"
    if p.name == "final":
        hint = f"it is a run's output: train the run that writes {p.parent} first"
    return Problem(key, f"{path} does not exist", hint)


def missing_models(recipe: Any) -> list[Problem]:
    """Model paths of a recipe (model, reference, reward models, critic) that can only be local directories
    and do not exist."""
    paths = [("model.path", recipe.model.path), ("method.reference", getattr(recipe.method, "reference", None))]
    paths += [(f"method.rewards.{i}.model", r.model) for i, r in enumerate(getattr(recipe.method, "rewards", None) or [])]
    critic = getattr(recipe.method, "critic", None)
    if critic not in (None, "policy", "reward_model"):
        paths.append(("method.critic", critic))
    return [m for key, path in paths if path and (m := missing_local_model(path, key))]


def mla_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a local model directory converted to MLA (an ``mla`` block in its config.json)."""
    config = Path(str(path)).expanduser() / "config.json"
    if str(path).startswith("builtin:") or not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("mla"))
    except (OSError, ValueError, AttributeError):
        return False  # unreadable: the ordinary loader reports it


def mla_checkpoint_problems(recipe: Any) -> list[Problem]:
    """A recipe whose models are MLA-converted directories must load them the ways MLA supports (no weights read)."""
    problems = []
    from tunelab.methods import method_module

    path = recipe.model.path
    if mla_checkpoint(path):
        if recipe.model.attn_implementation not in ("eager", "sdpa"):
            problems.append(Problem("model.attn_implementation", f"{path} is an MLA model: its attention reads eager "
                                    f"or sdpa masks, not {recipe.model.attn_implementation}", "use sdpa"))
        peft_method = getattr(recipe.peft, "method", None)
        if recipe.model.quantization is not None or peft_method == "qlora":
            key = "peft.method" if peft_method == "qlora" else "model.quantization"
            problems.append(Problem(key, f"{path} is an MLA model, which tunelab loads unquantized",
                                    "use peft.method: lora (or dora)"))
        if getattr(method_module(recipe.method), "MODEL_HEAD", "causal") != "causal":
            problems.append(Problem("model.path", f"{path} is an MLA model, which loads as a causal LM only; "
                                    f"method {recipe.method.name} needs a sequence classifier",
                                    "start the reward model from the unconverted model"))
        if getattr(recipe.method, "critic", None) == "policy":
            problems.append(Problem("method.critic", f"the critic would be a score-head copy of {path}, an MLA model, "
                                    "which loads as a causal LM only", "set method.critic to a reward model run or "
                                    "an unconverted model"))
    critic = getattr(recipe.method, "critic", None)
    if critic not in (None, "policy", "reward_model") and mla_checkpoint(critic):
        problems.append(Problem("method.critic", f"{critic} is an MLA model, which loads as a causal LM only",
                                "use a reward model run or an unconverted model"))
    for i, r in enumerate(getattr(recipe.method, "rewards", None) or []):
        if getattr(r, "model", None) and mla_checkpoint(r.model):
            problems.append(Problem(f"method.rewards.{i}.model", f"{r.model} is an MLA model, not a reward model",
                                    "use a reward model run"))
    return problems


def load_mla_checkpoint(path: str | Path, dtype: Any = None, attn_implementation: str = "sdpa") -> Any:
    """A causal LM saved after MLA conversion, in ``dtype`` (default: as saved), named by its path (PEFT reads it)."""
    from tunelab.patches.mla import load_mla_model

    if attn_implementation not in ("eager", "sdpa"):
        raise UserError(Problem("model.attn_implementation", f"{path} is an MLA model: its attention reads eager or "
                                f"sdpa masks, not {attn_implementation}", "use sdpa"))
    model = load_mla_model(path, attn_implementation=attn_implementation)
    if dtype is not None:
        model = model.to(dtype)
    # from_config leaves these empty; a PEFT adapter records its base from them
    model.name_or_path = str(path)
    model.config.name_or_path = str(path)
    return model


def load_config(spec: Any) -> Any | None:
    """The model's config without its weights (builtin, local dir, or a hub id in the local cache); None if unknown."""
    if spec.path.startswith("builtin:"):
        from tunelab.models.builtin import BUILTIN_MODELS, builtin_config

        name = spec.path[len("builtin:") :]
        return builtin_config(name) if name in BUILTIN_MODELS else None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError):
        return None  # not trained yet (a chain), or a hub id offline: noted elsewhere


def resolve_dtype(spec: Any, full_finetune: bool) -> Any:
    """auto: bf16 weights on a bf16 GPU for PEFT (fp32 master weights for full fine-tuning), fp32 on CPU."""
    import torch

    if spec.dtype != "auto":
        return getattr(torch, DTYPES[spec.dtype])
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not full_finetune:
        return torch.bfloat16
    return torch.float32


def load_tokenizer(spec: Any) -> Any:
    """The tokenizer, with a pad token (the eos token if the model has none)."""
    if spec.path.startswith("builtin:"):
        return builtin_tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except OSError as exc:
        raise UserError(Problem("model.path", f"cannot load tokenizer from {spec.path!r}: {exc}"[:500],
                                "check the hub id or directory (offline machines need a local copy)")) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def bnb_config(q: Any) -> Any:
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


def load_model(spec: Any, quantization: Any = None, full_finetune: bool = True, head: str = "causal") -> Any:
    """The causal LM of ``spec`` (quantized when a quantization block is given).

    ``head="score"`` loads the same checkpoint as a one-output sequence classifier (a reward
    model): the body's weights, a new score head unless the checkpoint already has one.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = resolve_dtype(spec, full_finetune)
    auto: Any = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    if spec.path.startswith("builtin:"):
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
    if mla_checkpoint(path):
        if quantization is not None:
            raise UserError(Problem("model.quantization", f"{path} is an MLA model, which tunelab loads unquantized",
                                    "use peft.method: lora (or dora)"))
        if head != "causal":
            raise UserError(Problem("model.path", f"{path} is an MLA model, which loads as a causal LM only",
                                    "start a reward model or critic from the unconverted model"))
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
