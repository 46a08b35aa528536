"""The few-step flow-matching schedule of streaming generators (architecture s.1).

A 1000-entry table: raw sigmas linearly spaced from 1 down to 0 over 1001 points with the last
dropped, shifted by ``shift * s / (1 + (shift - 1) * s)``; timesteps are ``1000 * sigma``. A
configured step ``t`` (e.g. 1000, 750, 500, 250) is "warped" to table entry ``1000 - t``. All of
it in float64, so another implementation can reproduce a run exactly.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

TABLE_SIZE = 1000


@dataclass(frozen=True)
class FlowMatchSchedule:
    """Denoising steps of one chunk.

    Args:
        steps: configured timesteps, each in ``1..1000`` (reference: 1000, 750, 500, 250).
        shift: the flow-matching shift (reference: 5).
        stochastic: between steps, re-noise the clean estimate with fresh noise (the few-step
            sampler of Self-Forcing / LongLive / MemFlow, for distilled models); ``False``
            re-noises it with the model's own noise estimate ``x0 + v`` instead, the
            deterministic flow-matching (DDIM, eta 0) step that models trained by plain flow
            matching sample best with.
    """

    steps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    stochastic: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.steps, (tuple, list)):
            raise TypeError(f"steps must be a tuple of ints in 1..{TABLE_SIZE}, got {self.steps!r}")
        if not self.steps:
            raise ValueError("steps must hold at least one timestep, got ()")
        for step in self.steps:
            if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= TABLE_SIZE:
                raise ValueError(f"steps must be ints in 1..{TABLE_SIZE}, got {step!r}")
        if isinstance(self.shift, bool) or not isinstance(self.shift, numbers.Real):
            raise TypeError(f"shift must be a finite number > 0, got {self.shift!r}")
        if not 0 < self.shift < math.inf:
            raise ValueError(f"shift must be a finite number > 0, got {self.shift}")
        if not isinstance(self.stochastic, bool):
            raise TypeError(f"stochastic must be a bool, got {self.stochastic!r}")

    @property
    def sigma_table(self) -> torch.Tensor:
        """``[1000]`` float64 shifted sigmas, from 1 down to just above 0."""
        raw = torch.linspace(1.0, 0.0, TABLE_SIZE + 1, dtype=torch.float64)[:-1]
        return self.shift * raw / (1 + (self.shift - 1) * raw)

    @property
    def timesteps(self) -> torch.Tensor:
        """``[len(steps)]`` float64 model timesteps (reference: 1000, 937.5, 833.3, 625)."""
        indices = torch.tensor([TABLE_SIZE - step for step in self.steps])
        return TABLE_SIZE * self.sigma_table[indices]

    def sigma_at(self, timestep: float | torch.Tensor) -> torch.Tensor:
        """The sigma of the table entry whose timestep is nearest ``timestep`` (float64)."""
        table = self.sigma_table
        index = (TABLE_SIZE * table - torch.as_tensor(timestep, dtype=torch.float64)).abs().argmin()
        return table[index]

    @staticmethod
    def predict_clean(noisy: torch.Tensor, flow: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``x0 = x_t - sigma * v``, computed in float64."""
        return noisy.double() - sigma * flow.double()

    @staticmethod
    def predict_noise(clean: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """``eps = x0 + v`` (the flow is ``v = eps - x0``), computed in float64."""
        return clean.double() + flow.double()

    @staticmethod
    def renoise(clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``x = (1 - sigma) * x0 + sigma * eps``, computed in float64."""
        return (1 - sigma) * clean.double() + sigma * noise.double()
