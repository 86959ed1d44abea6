"""Fixtures the unit tests of several packages share."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tunelab.cli import app


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """builtin:tiny-llama converted by the CLI once per session: R = 32, 8 RoPE dims per KV head (partial_rope high).

    Read only: tests that change a converted model convert their own."""
    out = tmp_path_factory.mktemp("mla") / "tiny-llama-mla"
    result = CliRunner().invoke(app, ["convert", "mla", "builtin:tiny-llama", "-o", str(out), "--kv-lora-rank", "32",
                                      "--rope-dim", "8"])
    assert result.exit_code == 0, result.output
    return out
