"""Fixtures shared by the data/ tests."""

import pytest

from tunelab.models.builtin import builtin_tokenizer


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()
