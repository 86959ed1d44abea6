"""Built-in tiny models: random-init configs sized to train in seconds on a CPU, offline.

They share one bundled byte-level BPE tokenizer (``assets/tokenizer.json``, 1435 tokens) whose
ChatML template marks assistant turns with ``{% generation %}`` for loss masking. Weights are
initialised from a fixed seed, so the "untrained model" is the same on every machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parent / "assets"
VOCAB_SIZE = 1536  # the bundled tokenizer has 1435 tokens; rounded up to a multiple of 64
_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=True,
)

# name -> (transformers model_type, config kwargs)
BUILTIN_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("llama", dict(_COMMON, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "tiny-qwen2": ("qwen2", dict(_COMMON, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "tiny-mistral": (
        "mistral",
        dict(_COMMON, head_dim=32, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
}
INIT_SEED = 1234


def builtin_config(name: str) -> Any:
    """The transformers config of a built-in model."""
    from transformers import AutoConfig

    model_type, kwargs = BUILTIN_MODELS[name]
    return AutoConfig.for_model(model_type, **kwargs)


def builtin_tokenizer() -> Any:
    """The bundled tokenizer with its ChatML chat template (assistant turns marked for the loss mask)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(ASSETS / "tokenizer.json"),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=1024,
    )
    tok.chat_template = (ASSETS / "chat_template.jinja").read_text(encoding="utf-8")
    return tok


def builtin_model(name: str, dtype: Any = None, attn_implementation: str = "sdpa", head: str = "causal") -> Any:
    """A freshly initialised built-in model (same weights every time: fixed seed).

    ``head="score"``: the same body with a one-output score head (a reward model) instead of
    the LM head.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

    config = builtin_config(name)
    config._attn_implementation = attn_implementation
    auto = AutoModelForCausalLM
    if head == "score":
        config.num_labels = 1
        auto = AutoModelForSequenceClassification  # type: ignore[assignment]  # both are auto classes
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(INIT_SEED)
        model = auto.from_config(config, attn_implementation=attn_implementation)
    if dtype is not None:
        model = model.to(dtype)
    if head == "score":
        return model
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=64, do_sample=False
    )
    return model
