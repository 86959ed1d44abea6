"""A progress bar for evaluation loops: on stderr, on the main process only, gone when done."""

from __future__ import annotations

import os
from typing import Any


def progress(total: int, desc: str, unit: str = "row") -> Any:
    """A tqdm bar over ``total`` items (disabled on ranks other than 0, and with TUNELAB_NO_PROGRESS=1)."""
    from tqdm.auto import tqdm

    off = os.environ.get("RANK", "0") != "0" or os.environ.get("TUNELAB_NO_PROGRESS") == "1"
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=off)
