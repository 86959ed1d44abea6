"""The PATCHES registry: recipe ``patches[].name`` -> the pydantic block of that patch.

A patch is a named, parameterised, documented transformation of a config or a loaded model,
applied in recipe order before PEFT. RoPE extension and MLA conversion register here.
"""

from __future__ import annotations

from pydantic import BaseModel

PATCHES: dict[str, type[BaseModel]] = {}
