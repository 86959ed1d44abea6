"""tests/gpu: every test here needs CUDA. Collected everywhere, marked ``gpu``, and skipped with the reason when
torch sees no CUDA device, so that ``pytest tests/gpu`` on a CPU machine shows skips, not errors.

Run them where a GPU is: ``scripts/gpu_checks.sh`` (``pytest -m gpu tests/gpu -x -q`` plus nvidia-smi).
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):  # noqa: ANN001 -- pytest hook
    here = __file__.rsplit("/", 1)[0]
    mine = [item for item in items if str(item.fspath).startswith(here)]
    if not mine:
        return
    import torch

    skip = None if torch.cuda.is_available() else pytest.mark.skip(
        reason="needs CUDA: torch.cuda.is_available() is False on this machine (run scripts/gpu_checks.sh on a GPU)")
    for item in mine:
        item.add_marker(pytest.mark.gpu)
        if skip is not None:
            item.add_marker(skip)
