"""Sparse Memory Activation: per head, attend only to the memory frames relevant to the queries
(architecture s.4).

Memory frames are the sink and bank frames; the local window is always attended. Token tensors use
diffusers' layout ``[B, frames * T_f, H, D]``.
"""

from __future__ import annotations

import torch

from .attention import attention


def select_memory_frames(
    query: torch.Tensor, memory_keys: torch.Tensor, tokens_per_frame: int, top_k: int
) -> torch.Tensor:
    """Pick, per batch element and head, the ``top_k`` memory frames whose mean key has the largest
    dot product with the mean query of the pass.

    Args:
        query: ``[B, N, H, D]`` post-RoPE queries of the current pass.
        memory_keys: ``[B, C * T_f, H, D]`` candidate frames' cached keys.
        tokens_per_frame: ``T_f``.
        top_k: frames to keep; all ``C`` are kept when ``top_k >= C``.

    Returns:
        ``[B, H, min(top_k, C)]`` int64 candidate indices, ascending (temporal order kept).
    """
    num_candidates = memory_keys.shape[1] // tokens_per_frame
    query_descriptor = query.float().mean(dim=1)  # [B, H, D]
    frame_descriptors = memory_keys.unflatten(1, (num_candidates, tokens_per_frame)).float().mean(2)
    scores = torch.einsum("bhd,bchd->bhc", query_descriptor, frame_descriptors)
    return scores.topk(min(top_k, num_candidates), dim=-1).indices.sort(dim=-1).values


def gather_frames_per_head(
    tokens: torch.Tensor, selected: torch.Tensor, tokens_per_frame: int
) -> torch.Tensor:
    """Per-head selection of frames.

    Args:
        tokens: ``[B, C * T_f, H, D]``.
        selected: ``[B, H, k]`` frame indices into the ``C`` frames.

    Returns:
        ``[B, H, k * T_f, D]`` (head-major, ready to be concatenated per head).
    """
    frames = tokens.unflatten(1, (-1, tokens_per_frame)).permute(0, 3, 1, 2, 4)  # [B, H, C, T, D]
    index = selected[..., None, None].expand(-1, -1, -1, *frames.shape[3:])
    return torch.gather(frames, 2, index).flatten(2, 3)


def sparse_memory_attention(
    query: torch.Tensor,
    memory_keys: torch.Tensor,
    memory_values: torch.Tensor,
    local_keys: torch.Tensor,
    local_values: torch.Tensor,
    selected: torch.Tensor,
    tokens_per_frame: int,
    backend: str = "sdpa",
) -> torch.Tensor:
    """One softmax over ``[selected memory frames ; local tokens]``; the selection differs per head.

    Args:
        query: ``[B, N, H, D]``.
        memory_keys, memory_values: ``[B, C * T_f, H, D]``.
        local_keys, local_values: ``[B, L, H, D]`` (window frames and the pass's own tokens).
        selected: ``[B, H, k]`` from ``select_memory_frames``.

    Returns:
        ``[B, N, H, D]``.
    """
    keys = torch.cat(
        [
            gather_frames_per_head(memory_keys, selected, tokens_per_frame),
            local_keys.transpose(1, 2),
        ],
        dim=2,
    )
    values = torch.cat(
        [
            gather_frames_per_head(memory_values, selected, tokens_per_frame),
            local_values.transpose(1, 2),
        ],
        dim=2,
    )
    return attention(query, keys.transpose(1, 2), values.transpose(1, 2), backend)
