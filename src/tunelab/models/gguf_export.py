"""Export a trained model as one GGUF file (what llama.cpp, Ollama and LM Studio read).

Written with the ``gguf`` package's writer, in llama.cpp's layout: its tensor names
(``blk.N.attn_q.weight`` ...), its metadata keys (``llama.block_count``, ``tokenizer.ggml.*``),
and the one transform llama.cpp applies to llama-architecture weights: the rows of q_proj and
k_proj are permuted from Hugging Face's half-split rotary layout back to the interleaved one
llama.cpp rotates (transformers' GGUF reader undoes exactly this permutation on load).

What travels in the file besides the merged weights: the byte-level BPE tokenizer (tokens,
types, merges, and the pre-tokenizer name whose split rule matches the one trained with), the
chat template the run trained with (its ``{% generation %}`` loss-mask markers removed: the
training templates are the official ones plus those markers), and the stop tokens (eos, and
the template's end-of-turn token as ``eot``).

Supported: llama, mistral (written as llama, as llama.cpp does: the same graph without a sliding
window; transformers reads it back as a Llama model), qwen2, qwen3 with a byte-level
BPE tokenizer and default RoPE. Refused with the reason: SentencePiece tokenizers (Llama 2,
Mistral v0.3, Gemma), RoPE-extended models, MLA-converted models, prefix/prompt adapters.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.templates import TemplateMismatch, choice_of
from tunelab.errors import Problem, UserError
from tunelab.log import say
from tunelab.models.inference import load_for_inference
from tunelab.models.ref import ResolvedModel, as_resolved

OUT_TYPES = ("f16", "bf16", "q8_0", "f32")
_MARKERS = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


@dataclass(frozen=True)
class Arch:
    """How one transformers model_type is written."""

    gguf: str  # general.architecture
    permute_qk: bool  # llama.cpp's llama graph rotates interleaved pairs: permute q/k rows
    head_dim_key: bool = False  # write attention.key_length/value_length (head_dim need not be hidden/heads)


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", permute_qk=True),
    "mistral": Arch("llama", permute_qk=True),
    "qwen2": Arch("qwen2", permute_qk=False),
    "qwen3": Arch("qwen3", permute_qk=False, head_dim_key=True),
}

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) -> the split rule both llama.cpp and
# transformers' GGUF reader apply for it; the first whose splits equal the trained tokenizer's wins
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS: dict[str, str | None] = {"gpt-2": None, "llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
                                     "tekken": _TEKKEN_SPLIT}
_PROBES = ["Hello world! It's 2026: 12345 apples, 3.14 pies.\n\n  indented\ttab\r\nCRLF",
           "ÀÉÎõü naïve café 你好世界 мир 🤖 emoji's THEY'LL don't I'M",
           "    def f(x):\n        return x**2  # comment\n\n\n", "a\n\nb   c \n ", "1\n22\n333\n4444 55555"]


def strip_generation_markers(template: str) -> str:
    """The chat template without ``{% generation %}`` / ``{% endgeneration %}`` (transformers-only tags)."""
    return _MARKERS.sub("", template)


def _pre_tokenizer_name(tok: Any) -> str:
    """The llama.cpp pre-tokenizer whose splits equal this tokenizer's on the probe texts."""
    from tokenizers import Regex, pre_tokenizers

    theirs = tok.backend_tokenizer.pre_tokenizer
    if theirs is None:
        raise UserError(Problem("MODEL", "the tokenizer has no pre-tokenizer: not a byte-level BPE tokenizer "
                                "llama.cpp can read", "GGUF export supports byte-level BPE tokenizers"))
    for name, split in PRE_SPLITS.items():
        if split is None:
            ours: Any = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            ours = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if all([w for w, _ in theirs.pre_tokenize_str(p)] == [w for w, _ in ours.pre_tokenize_str(p)]
               for p in _PROBES):
            return name
    raise UserError(Problem("MODEL", "the tokenizer splits text with a rule llama.cpp does not know under any of "
                            f"the names tunelab writes ({', '.join(PRE_SPLITS)})",
                            "export the model's weights with llama.cpp's own convert_hf_to_gguf.py"))


def tokenizer_metadata(tok: Any, vocab_size: int) -> dict[str, Any]:
    """tokens, token types, merges, pre-tokenizer, special ids and flags of a byte-level BPE tokenizer."""
    from gguf import TokenType

    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    kinds = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if model.get("type") != "BPE" or '"ByteLevel"' not in kinds:
        raise UserError(Problem("MODEL", f"the tokenizer is {model.get('type')} without byte-level pre-tokenization "
                                "(a SentencePiece-style vocabulary: Llama 2, Mistral v0.3, Gemma)",
                                "GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen, SmolLM, Mistral "
                                "tekken); for this one use llama.cpp's convert_hf_to_gguf.py"))
    if spec.get("normalizer") not in (None, {"type": "NFC"}):
        raise UserError(Problem("MODEL", f"the tokenizer normalizes text ({spec['normalizer'].get('type')}), which "
                                "llama.cpp's byte-level BPE does not", "use llama.cpp's convert_hf_to_gguf.py"))
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens") or []}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens: list[str] = [f"[PAD{i}]" for i in range(size)]
    types = [int(TokenType.UNUSED)] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = int(TokenType.CONTROL if added.get(text, {}).get("special")
                       else TokenType.USER_DEFINED if text in added else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    probe = "a"
    with_special, plain = tok(probe)["input_ids"], tok(probe, add_special_tokens=False)["input_ids"]
    meta: dict[str, Any] = {"model": "gpt2", "pre": _pre_tokenizer_name(tok), "tokens": tokens, "types": types,
                            "merges": merges, "add_bos": tok.bos_token_id is not None and with_special[:1] == [
                                tok.bos_token_id] and plain[:1] != [tok.bos_token_id],
                            "add_eos": tok.eos_token_id is not None and with_special[-1:] == [tok.eos_token_id]
                            and plain[-1:] != [tok.eos_token_id]}
    for key in ("bos", "eos", "pad", "unk"):
        meta[key] = getattr(tok, f"{key}_token_id", None)
    return meta


def _permute(w: Any, n_head: int) -> Any:
    """Hugging Face's half-split rotary rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _arch_of(config: Any, source: str) -> Arch:
    if getattr(config, "mla", None) or getattr(config, "kv_lora_rank", None):
        raise UserError(Problem("MODEL", f"{source} has MLA attention, which llama.cpp's {config.model_type} graph "
                                "does not run", "export the unconverted model, or `tunelab export deepseek` first"))
    arch = ARCHS.get(config.model_type)
    if arch is None:
        raise UserError(Problem("MODEL", f"GGUF export does not support model_type {config.model_type!r}",
                                "supported: " + ", ".join(ARCHS)))
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(Problem("MODEL", f"{source} uses RoPE scaling {rope.get('rope_type')!r} (a rope patch): its "
                                "GGUF metadata is not written by tunelab yet, and a file without it would rotate "
                                "positions wrongly", "export a model trained without model patches"))
    return arch


def write_gguf(model: Any, tok: Any, output: Path, out_type: str = "f16", name: str | None = None,
               chat_template: str | None = None) -> dict[str, Any]:
    """Write ``model`` (a merged transformers causal LM) and ``tok`` as one GGUF file; returns what was written."""
    import gguf
    import numpy as np
    import torch

    if out_type not in OUT_TYPES:
        raise UserError(Problem("--type", f"unknown type {out_type!r}", "use " + ", ".join(OUT_TYPES)))
    config = model.config
    arch = _arch_of(config, name or "the model")
    tokmeta = tokenizer_metadata(tok, config.vocab_size)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    model_name = name or getattr(config, "_name_or_path", "") or config.model_type
    if arch.gguf == "llama" and "mistral" in model_name.lower():
        # transformers' GGUF reader takes a llama file named *mistral* for an architecture gguf has no tensor
        # map for and fails to load it; llama.cpp ignores the name. Keep the file readable by both.
        model_name = re.sub("mistral", "mstral", model_name, flags=re.IGNORECASE)
    if getattr(config, "sliding_window", None) and arch.gguf == "llama":
        say(f"note: sliding_window={config.sliding_window} is not written (llama.cpp's llama graph attends fully)")

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")  # a killed export never leaves a half file under the name
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    w = gguf.GGUFWriter(str(partial), arch.gguf)
    w.add_name(model_name)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(len(tokmeta["tokens"]))
    w.add_rope_dimension_count(head_dim)
    if arch.head_dim_key:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)

    w.add_tokenizer_model(tokmeta["model"])
    w.add_tokenizer_pre(tokmeta["pre"])
    w.add_token_list(tokmeta["tokens"])
    w.add_token_types(tokmeta["types"])
    w.add_token_merges(tokmeta["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                     ("unk", w.add_unk_token_id)):
        if tokmeta[key] is not None:
            add(int(tokmeta[key]))
    w.add_add_bos_token(bool(tokmeta["add_bos"]))
    w.add_add_eos_token(bool(tokmeta["add_eos"]))
    w.add_add_space_prefix(False)
    eot = end_of_turn_id(tok)
    if eot is not None and eot != tokmeta["eos"]:
        w.add_eot_token_id(eot)
    template = chat_template if chat_template is not None else tok.chat_template
    if template:
        w.add_chat_template(strip_generation_markers(template))

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf.upper()], config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # a tied head is the embedding: no output.weight, which readers take as "tied"
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise UserError(Problem("MODEL", f"tensor {hf_name} has no llama.cpp name for {arch.gguf}",
                                    "this model has a layer llama.cpp's graph lacks; export is not possible"))
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, n_head)
        elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, n_kv)
        qtype, data = _encode(gguf, np, data, out_type)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
        w.add_tensor(gname, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(partial, output)
    return {"path": str(output), "architecture": arch.gguf, "type": out_type, "tensor_types": counts,
            "bytes": output.stat().st_size, "tied_embeddings": tied, "pre_tokenizer": tokmeta["pre"],
            "eos": tokmeta["eos"], "eot": eot, "add_bos": bool(tokmeta["add_bos"])}


def _encode(gguf: Any, np: Any, data: Any, out_type: str) -> tuple[Any, Any]:
    """(GGML type, array to write): 1-D tensors stay F32 as llama.cpp keeps them; Q8_0 needs rows of 32."""
    Q = gguf.GGMLQuantizationType
    if data.ndim < 2 or out_type == "f32":
        return Q.F32, data.astype(np.float32)
    if out_type == "q8_0" and data.shape[-1] % 32 == 0:
        return Q.Q8_0, gguf.quants.quantize(data, Q.Q8_0)
    if out_type == "bf16":
        return Q.BF16, gguf.quants.quantize(data, Q.BF16)
    return Q.F16, data.astype(np.float16)


def end_of_turn_id(tok: Any) -> int | None:
    """The id of the chat template's end-of-turn token (the registry's), or None for an unknown template."""
    try:
        eot = choice_of(tok).end_of_turn
    except (TemplateMismatch, AttributeError, ValueError):
        return None
    if not eot:
        return None
    ids = tok.convert_tokens_to_ids([eot])
    return ids[0] if ids and ids[0] is not None and ids[0] != tok.unk_token_id else None


def load_merged(source: ResolvedModel | str) -> tuple[Any, Any]:
    """(merged causal LM, tokenizer) of a run dir, final/, LoRA adapter or model dir; prefix/prompt refused."""
    source = as_resolved(source)
    if source.kind == "adapter" and source.peft_type not in ("LORA", None):
        raise UserError(Problem(source.key, f"{source.given} is a {source.peft_type} adapter: its virtual tokens do "
                                "not fold into weights, and llama.cpp cannot run them",
                                "export a full or LoRA/DoRA/QLoRA fine-tune"))
    model, tok = load_for_inference(source, merge=True)
    return model.eval(), tok


def run_export_gguf(source: str, output: Path, out_type: str = "f16") -> dict[str, Any]:
    """`tunelab export gguf`: load, merge, write, say what was written."""
    if out_type not in OUT_TYPES:
        raise UserError(Problem("--type", f"unknown type {out_type!r}", "use " + ", ".join(OUT_TYPES)))
    if output.suffix.lower() != ".gguf":
        raise UserError(Problem("--output", f"{output} does not end in .gguf", "name the file MODEL.gguf"))
    if output.is_dir():
        raise UserError(Problem("--output", f"{output} is a directory", "give a file path ending in .gguf"))
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise UserError(Problem("tunelab export gguf", "writing GGUF needs the gguf package", 'pip install "tunelab[gguf]"'))
    resolved = as_resolved(source)
    model, tok = load_merged(resolved)
    info = write_gguf(model, tok, output, out_type, name=resolved.short_name)
    types = ", ".join(f"{n} {k}" for k, n in sorted(info["tensor_types"].items()))
    stops = [tok.convert_ids_to_tokens(i) for i in (info["eos"], info["eot"]) if i is not None]
    say(f"wrote {output} ({info['bytes'] / 1e6:.1f} MB, {info['architecture']}, tensors: {types}; "
        f"{'tied' if info['tied_embeddings'] else 'untied'} embeddings; pre-tokenizer {info['pre_tokenizer']}; "
        f"stops at {', '.join(stops)})")
    return info
