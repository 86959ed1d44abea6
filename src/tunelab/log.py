"""``say``: the one voice of tunelab on stdout, ``[tunelab] ...``, from rank 0 only when several processes run."""

from __future__ import annotations

import os


def say(msg: str) -> None:
    """Print a tunelab message once per job: on rank 0 (``RANK`` unset counts as 0), flushed at once."""
    if os.environ.get("RANK", "0") == "0":
        print(f"[tunelab] {msg}", flush=True)
