"""Shared fixtures. The whole suite runs offline: huggingface_hub reads HF_HUB_OFFLINE when it
is imported, so it is set here, before any test module imports it."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
