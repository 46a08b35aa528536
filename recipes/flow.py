"""Flow-matching pieces shared by the recipes: noise levels, per-step randomness, the loss.

Every random draw of a training step comes from generators seeded by ``(seed, step)`` (shared by
all processes: decisions such as exit steps) and ``(seed, step, process)`` (noise, data), so a
resumed run needs nothing but the step number to draw exactly what an uninterrupted run draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from memflow_adapter.schedule import TABLE_SIZE, FlowMatchSchedule

from .config import check


@dataclass(frozen=True)
class NoiseRange:
    """Where training noise levels are drawn: a uniform table entry whose unshifted timestep is in
    ``[low, high]`` (fractions of 1000), then shifted like the schedule (DMD2 / Self-Forcing draw
    from 0.02 .. 0.98)."""

    low: float = 0.02
    high: float = 0.98

    def __post_init__(self) -> None:
        check(0.0 <= self.low < 1.0, "low", "in [0, 1)", self.low)
        check(self.low < self.high <= 1.0, "high", f"in (low={self.low}, 1]", self.high)


@dataclass(frozen=True)
class StepRandomness:
    """The generators of one training step (CPU, so a run draws the same on any device)."""

    shared: torch.Generator
    local: torch.Generator

    @classmethod
    def for_step(cls, seed: int, step: int, process: int) -> StepRandomness:
        return cls(seeded_generator(seed, step), seeded_generator(seed, step, process + 1))

    def randn(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Local float32 standard normal noise."""
        return torch.randn(shape, generator=self.local).to(device)


def seeded_generator(*entropy: int) -> torch.Generator:
    """A CPU generator seeded from the integers ``entropy`` (numpy's ``SeedSequence``)."""
    seed = np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(seed))


def sample_sigmas(
    schedule: FlowMatchSchedule, noise: NoiseRange, batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """``[B]`` float64 sigmas drawn from ``schedule``'s shifted table within ``noise``."""
    first = round((1.0 - noise.high) * TABLE_SIZE)
    stop = max(first + 1, round((1.0 - noise.low) * TABLE_SIZE))
    index = torch.randint(first, stop, (batch_size,), generator=generator)
    return schedule.sigma_table[index]


def per_sample(values: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, 1, 1, 1]``, to scale ``[B, C, F, h, w]`` latents."""
    return values.view(-1, 1, 1, 1, 1)


def flow_matching_loss(
    flow: torch.Tensor, noise: torch.Tensor, clean: torch.Tensor
) -> torch.Tensor:
    """Mean squared error of a predicted flow against its target ``noise - clean`` (float32)."""
    return torch.nn.functional.mse_loss(flow.float(), (noise - clean).float())
