"""Sparse Memory Activation's reference score (architecture s.4): mean query x mean key."""

from __future__ import annotations

import torch

from .base import ActivationPolicy, register_activation_policy


@register_activation_policy("sma")
class SparseMemoryActivation(ActivationPolicy):
    """Per head, the dot product of the pass's mean query with each memory frame's mean key."""

    def score(self, query: torch.Tensor, memory_keys: torch.Tensor) -> torch.Tensor:
        # float32 means without a float32 copy of the tokens (under bfloat16)
        query_descriptor = query.mean(dim=1, dtype=torch.float32)  # [B, H, D]
        frame_descriptors = memory_keys.mean(2, dtype=torch.float32)  # [B, C, H, D]
        return torch.einsum("bhd,bchd->bhc", query_descriptor, frame_descriptors)
