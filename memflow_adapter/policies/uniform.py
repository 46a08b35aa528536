"""Uniform keyframes: the bank keeps frames evenly spaced over the history (FramePack-like)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import BankCandidates, BankPolicy, register_bank_policy


@register_bank_policy("uniform")
class UniformKeyframes(BankPolicy):
    """Drop the frame whose neighbours are closest together: the gap its removal would leave,
    between the frame before it (the sink's last frame for the oldest) and the frame after it
    (the staged frame for the newest), is its score. Kept one commit after another, the bank's
    frames spread evenly over the video. Of two frames with equal gaps the newer one leaves."""

    def score(self, candidates: BankCandidates) -> torch.Tensor:
        frames = candidates.frames.double()  # [B, C]
        before = F.pad(frames[:, :-1], (1, 0), value=candidates.sink_frames - 1)
        after = F.pad(frames[:, 1:], (0, 1), value=candidates.staged_frame)
        # the tie-break stays below 1, the smallest difference of two gaps
        return (after - before) - frames / (candidates.staged_frame + 1)
