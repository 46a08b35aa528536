"""Shared fixtures. The whole suite runs offline: huggingface_hub reads HF_HUB_OFFLINE when it
is imported, so it is set here, before any test module imports it. ``make test`` runs the suite
in two pytest-xdist workers, one per core of the reference machine: each worker computes on one
thread, so the two never fight over a core."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def fresh_accelerate_state():
    """Forget accelerate's process-wide state after a test that ran a recipe."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
