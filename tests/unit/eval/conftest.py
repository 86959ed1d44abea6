"""Fixtures shared by the eval/ tests."""

import pytest

from tunelab.models.builtin import builtin_model, builtin_tokenizer


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


@pytest.fixture(scope="module")
def model():
    return builtin_model("tiny-llama").eval()
