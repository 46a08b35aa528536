"""Visual relevance: the bank keeps the frames most similar to what was just generated (retrieval
without text, as in LongLive-RAG or context-as-memory)."""

from __future__ import annotations

import torch

from .base import BankCandidates, BankPolicy, register_bank_policy
from .nam import nam_scores


@register_bank_policy("visual")
class VisualRelevance(BankPolicy):
    """NAM's relevance with the newest chunk's keys in place of the prompt's: the mean of
    ``k_new . k / sqrt(D)`` over the newest frames' tokens, heads and the frame's tokens."""

    def score(self, candidates: BankCandidates) -> torch.Tensor:
        newest = candidates.newest_keys  # [B, n, T_f, H, D]
        return nam_scores(newest.flatten(1, 2), candidates.keys, candidates.num_heads)
