"""Shared fixtures. The whole suite runs offline: huggingface_hub reads HF_HUB_OFFLINE when it
is imported, so it is set here, before any test module imports it."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def fresh_accelerate_state():
    """Forget accelerate's process-wide state after a test that ran a recipe."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
