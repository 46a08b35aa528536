"""Narrative Adaptive Memory: score bank frames against a prompt, refresh the bank
(architecture s.3)."""

from __future__ import annotations

import math

import torch

from .cache import LayerCache
from .context_parallel import HeadShard


def bank_slot_for_commit(chunk_index: int, record_interval: int, bank_frames: int) -> int | None:
    """Slot that the frame staged by chunk ``chunk_index - 1`` overwrites while the bank fills.

    The commit happens at the start of chunk ``chunk_index`` (>= 1). Consecutive
    ``record_interval`` commits share a slot, so the slot ends up with the last of them. Returns
    ``None`` once the pointer has passed the bank: from then on every commit runs the selection.
    """
    if chunk_index < 1:
        raise ValueError(
            f"chunk_index must be >= 1 (chunk 0 has nothing to commit), got {chunk_index}"
        )
    pointer = (chunk_index - 1) // record_interval + 1
    return pointer - 1 if pointer <= bank_frames else None


def nam_scores(
    text_keys: torch.Tensor, frame_keys: torch.Tensor, num_heads: int | None = None
) -> torch.Tensor:
    """Relevance of each frame to a prompt: the mean of ``q . k / sqrt(D)`` over text tokens,
    heads and the frame's tokens, with the text keys as queries.

    The mean of a bilinear form over two token sets is the form of the two means, so the text and
    frame keys are averaged over tokens first (exact, and O(L + T) rather than O(L * T)).

    Args:
        text_keys: ``[B, L_text, H, D]``, the layer's cross-attention keys of the prompt.
        frame_keys: ``[B, F, T_f, H, D]``, cached post-RoPE keys of ``F`` frames.
        num_heads: the heads the mean is over (default ``H``); more when these are one rank's
            heads under context parallelism, whose scores are then summed over the ranks.

    Returns:
        ``[B, F]`` float32 scores.
    """
    if text_keys.ndim != 4:
        raise ValueError(f"text_keys must be [B, L_text, H, D], got shape {tuple(text_keys.shape)}")
    if frame_keys.ndim != 5:
        raise ValueError(
            f"frame_keys must be [B, F, T_f, H, D], got shape {tuple(frame_keys.shape)}"
        )
    b, _, h, d = text_keys.shape
    if (frame_keys.shape[0], frame_keys.shape[3], frame_keys.shape[4]) != (b, h, d):
        raise ValueError(
            f"text_keys [B={b}, H={h}, D={d}] do not match frame_keys of shape "
            f"{tuple(frame_keys.shape)} (expected [B={b}, F, T_f, H={h}, D={d}])"
        )
    text_mean = text_keys.float().mean(dim=1)  # [B, H, D]
    frame_mean = frame_keys.float().mean(dim=2)  # [B, F, H, D]
    heads = h if num_heads is None else num_heads
    return torch.einsum("bhd,bfhd->bf", text_mean, frame_mean) / (heads * math.sqrt(d))


def select_kept_slots(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` highest-scoring slots per batch element, in slot (temporal) order.

    Args:
        scores: ``[B, M]``.

    Returns:
        ``[B, keep]`` int64 slot indices, ascending.
    """
    return scores.topk(keep, dim=1).indices.sort(dim=1).values


def update_bank(
    cache: LayerCache,
    chunk_index: int,
    text_keys: torch.Tensor | None,
    head_shard: HeadShard | None = None,
) -> None:
    """Commit the staged frame at the start of chunk ``chunk_index`` (architecture s.3, steps 1-2).

    While the bank fills, the frame goes to the slot the pointer names (``bank_staging=
    "every_chunk"``) or to the next free slot (``"interval"``); afterwards the bank keeps its
    ``bank_frames - 1`` frames most relevant to ``text_keys`` and appends the staged frame.

    Args:
        cache: the layer's cache, with a staged frame.
        chunk_index: the chunk about to be generated (>= 1).
        text_keys: ``[B, L_text, H, D]`` keys of the prompt that chunk will be generated with;
            needed only once the bank is full.
        head_shard: under context parallelism, the heads ``cache`` and ``text_keys`` hold: the
            scores are summed over the ranks, so that every rank keeps the same frames.
    """
    config = cache.config
    if config.bank_staging == "every_chunk":
        slot = bank_slot_for_commit(chunk_index, config.record_interval, config.bank_frames)
    else:  # "interval": only some chunks stage; each staged frame takes the next free slot
        slot = cache.bank_filled if cache.bank_filled < config.bank_frames else None
    if slot is not None:
        cache.commit_staged_to_slot(slot)
        return
    if text_keys is None:
        raise ValueError("text_keys are required to select bank frames once the bank is full")
    if head_shard is None:
        scores = nam_scores(text_keys, cache.bank_by_frame())
    else:
        partial = nam_scores(text_keys, cache.bank_by_frame(), head_shard.num_heads)
        scores = head_shard.sum(partial)
    cache.commit_staged_after(select_kept_slots(scores, config.bank_frames - 1))
