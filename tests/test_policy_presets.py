"""The memory policies changed nothing a preset computes: every preset's latents and memory
picks equal those recorded before the policy interface existed (``tests/preset_streams.py``)."""

import pytest
import torch

from memflow_adapter import MemFlowConfig
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline
from tests.preset_streams import CASES, RECORDING, preset_stream

RECORDED = torch.load(RECORDING, weights_only=True)


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_tiny_wan_pipeline(seed=0)


def test_the_recording_holds_every_case_with_its_config():
    assert set(RECORDED["recordings"]) == set(CASES)
    for name, config in CASES.items():
        # the recorded config, read back, is the case's config with today's defaults
        assert MemFlowConfig.from_dict(RECORDED["configs"][name]) == config


@pytest.mark.parametrize("name", list(CASES))
def test_a_preset_streams_the_recorded_latents_and_picks(tiny_pipe, name):
    recorded = RECORDED["recordings"][name]
    streamed = preset_stream(tiny_pipe, CASES[name])
    assert set(streamed) == set(recorded)
    for key in sorted(set(recorded) - {"latents"}):
        # memory picks are integers: equal, not close
        assert torch.equal(streamed[key], recorded[key]), f"{name}: {key} changed"
    # Equal bit for bit on the machine that recorded them; elsewhere the CPU's kernels may
    # differ in the last bits of float32 over 12 chunks x 4 steps of a 2-layer model.
    torch.testing.assert_close(streamed["latents"], recorded["latents"], rtol=1e-4, atol=1e-5)
