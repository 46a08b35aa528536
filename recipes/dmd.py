"""Distribution matching distillation (DMD / DMD2, as Self-Forcing and LongLive use it).

A generated clip ``x`` is re-noised at a random level; the frozen teacher ("real score", with
classifier-free guidance) and the trained critic ("fake score") each estimate its clean version.
Their difference, normalised per sample by the mean distance between ``x`` and the teacher's
estimate, is the gradient that moves the generator's distribution towards the teacher's; the
generator loss is the surrogate ``0.5 * ||x - stopgrad(x - grad)||^2`` whose gradient it is. The
critic learns the generator's distribution by flow-matching denoising of (detached) generated clips.
"""

from __future__ import annotations

import torch
from torch.nn import functional


def distribution_matching_gradient(
    clip: torch.Tensor, real_clean: torch.Tensor, fake_clean: torch.Tensor
) -> torch.Tensor:
    """DMD's gradient on the generated clip.

    Args:
        clip: ``[B, C, F, h, w]`` the generated clean latents.
        real_clean, fake_clean: the teacher's and the critic's clean estimates of the re-noised
            clip, same shape.

    Returns:
        ``(fake_clean - real_clean) / mean |clip - real_clean|`` (mean per sample), float64; a
        sample whose normaliser is zero (the clip is the teacher's estimate) gets no gradient.
    """
    clip, real_clean, fake_clean = clip.double(), real_clean.double(), fake_clean.double()
    normaliser = (clip - real_clean).abs().mean(dim=tuple(range(1, clip.ndim)), keepdim=True)
    return torch.nan_to_num((fake_clean - real_clean) / normaliser, posinf=0.0, neginf=0.0)


def dmd_loss(generated: torch.Tensor, target: torch.Tensor, total_elements: int) -> torch.Tensor:
    """The generator surrogate on part of a clip: ``0.5 * sum((generated - target)^2) /
    total_elements`` with ``target = stopgrad(clip - grad)``; the parts of one clip add up to
    ``0.5 * mse(clip, target)``, whose gradient with respect to the clip is ``grad / N``."""
    return 0.5 * functional.mse_loss(
        generated.double(), target.detach().double(), reduction="sum"
    ) / total_elements
