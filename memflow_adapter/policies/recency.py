"""Recency: the bank keeps the newest staged frames, an extended local window (the baseline a
retrieval policy must beat)."""

from __future__ import annotations

import torch

from .base import BankCandidates, BankPolicy, register_bank_policy


@register_bank_policy("recency")
class Recency(BankPolicy):
    """The newer the frame, the higher its score: the oldest frame leaves the bank first."""

    def score(self, candidates: BankCandidates) -> torch.Tensor:
        return candidates.frames.float()
