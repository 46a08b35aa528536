"""Flow-matching pieces shared by the recipes: noise levels, per-step randomness, the loss.

Every random draw of a training step comes from generators seeded by ``(seed, step)`` (shared by
all processes: decisions such as exit steps) and ``(seed, step, sample)`` per sample of the step's
global batch (noise, data), so a resumed run needs nothing but the step number to draw exactly
what an uninterrupted run draws, and the draws do not depend on how the global batch is split
across processes (2 processes of 1 video draw what 1 process of 2 videos draws).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

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


class Noised(NamedTuple):
    """Clean latents noised for training: ``noisy`` (the model's input) and ``noise``
    ``[B, C, F, h, w]``, the levels ``sigma`` ``[B, 1, 1, 1, 1]`` float64 and the model
    ``timestep`` ``[B]``."""

    noisy: torch.Tensor
    noise: torch.Tensor
    sigma: torch.Tensor
    timestep: torch.Tensor


@dataclass(frozen=True)
class StepRandomness:
    """The generators of one training step (CPU, so a run draws the same on any device).

    Attributes:
        shared: seeded by ``(seed, step)``: the same on every process.
        samples: one per row of this process's batch, seeded by ``(seed, step, 1 + i)`` for the
            row's index ``i`` in the step's global batch.
    """

    shared: torch.Generator
    samples: tuple[torch.Generator, ...]

    @classmethod
    def for_step(
        cls, seed: int, step: int, first_sample: int, batch_size: int = 1
    ) -> StepRandomness:
        """The generators of a process whose batch holds global samples ``first_sample ..
        first_sample + batch_size - 1``."""
        check(batch_size >= 1, "batch_size", "an int >= 1", batch_size)
        samples = tuple(
            seeded_generator(seed, step, first_sample + row + 1) for row in range(batch_size)
        )
        return cls(seeded_generator(seed, step), samples)

    def randn(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Float32 standard normal noise ``shape`` = ``[B, ...]``, row ``b`` from sample ``b``'s
        generator."""
        self._check_rows(shape[0])
        rows = [torch.randn((1, *shape[1:]), generator=g) for g in self.samples]
        return torch.cat(rows).to(device)

    def rand(self) -> torch.Tensor:
        """``[B]`` float32 uniform draws in ``[0, 1)``, one per sample."""
        return torch.cat([torch.rand(1, generator=g) for g in self.samples])

    def sigmas(self, schedule: FlowMatchSchedule, noise: NoiseRange) -> torch.Tensor:
        """``[B]`` float64 noise levels (``sample_sigmas``), one per sample."""
        return torch.cat([sample_sigmas(schedule, noise, 1, g) for g in self.samples])

    def noised(
        self, clean: torch.Tensor, schedule: FlowMatchSchedule, levels: NoiseRange
    ) -> Noised:
        """The training-time noising of both recipes: ``clean`` ``[B, C, F, h, w]`` at a noise
        level per sample drawn within ``levels`` (``sigmas``), with fresh noise (``randn``),
        drawn in that order."""
        sigma = per_sample(self.sigmas(schedule, levels).to(clean.device))
        noise = self.randn(tuple(clean.shape), clean.device)
        return Noised(
            schedule.renoise(clean, noise, sigma), noise, sigma, TABLE_SIZE * sigma.flatten()
        )

    def _check_rows(self, rows: int) -> None:
        if rows != len(self.samples):
            raise ValueError(
                f"a draw for {rows} batch rows from the generators of {len(self.samples)} samples"
            )


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
