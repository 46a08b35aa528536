"""The few-step flow-matching schedule (architecture s.1)."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from memflow_adapter.schedule import FlowMatchSchedule


def test_reference_steps_warp_to_1000_937_833_625():
    timesteps = FlowMatchSchedule().timesteps
    assert timesteps.dtype == torch.float64
    torch.testing.assert_close(
        timesteps, torch.tensor([1000.0, 937.5, 2500.0 / 3.0, 625.0], dtype=torch.float64)
    )


def test_the_table_is_diffusers_shifted_flow_matching_table():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    torch.testing.assert_close(
        FlowMatchSchedule(shift=5.0).sigma_table,
        scheduler.sigmas[:1000].double(),
        rtol=1e-6,
        atol=1e-6,
    )


def test_sigma_is_looked_up_at_the_nearest_table_timestep():
    schedule = FlowMatchSchedule()
    assert schedule.sigma_at(937.5) == schedule.sigma_table[250]
    assert schedule.sigma_at(937.4) == schedule.sigma_table[250]
    assert schedule.sigma_at(1000.0) == 1.0


def test_x0_and_renoising_follow_the_flow_matching_identities(generator):
    clean = torch.randn(2, 3, generator=generator)
    noise = torch.randn(2, 3, generator=generator)
    sigma = torch.tensor(0.625, dtype=torch.float64)
    noisy = FlowMatchSchedule.renoise(clean, noise, sigma)
    flow = noise.double() - clean.double()  # the exact velocity of the straight path
    torch.testing.assert_close(FlowMatchSchedule.predict_clean(noisy, flow, sigma), clean.double())
    torch.testing.assert_close(FlowMatchSchedule.predict_noise(clean, flow), noise.double())


def test_sampling_is_stochastic_by_default_as_in_self_forcing():
    assert FlowMatchSchedule().stochastic
    assert not FlowMatchSchedule(stochastic=False).stochastic


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": ()}, "at least one timestep"),
        ({"steps": (1000, 0)}, r"steps must be ints in 1..1000, got 0"),
        ({"steps": (999.5,)}, "steps must be ints"),
        ({"shift": 0.0}, "shift must be a finite number > 0"),
    ],
)
def test_bad_schedules_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlowMatchSchedule(**kwargs)
