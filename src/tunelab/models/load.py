"""Load a model and tokenizer from a hub id, a local directory or ``builtin:tiny-*``.

``trust_remote_code`` only ever comes from the recipe; weights load from safetensors only.
"""

from __future__ import annotations

import importlib.util
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
