"""Narrative Adaptive Memory (the paper's bank policy, architecture s.3): keep the frames most
relevant to the coming chunk's prompt."""

from __future__ import annotations

import math

import torch

from .base import BankCandidates, BankPolicy, register_bank_policy


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


@register_bank_policy("nam")
class NarrativeAdaptiveMemory(BankPolicy):
    """The frames whose keys the coming prompt's text keys attend to most (``nam_scores``)."""

    def score(self, candidates: BankCandidates) -> torch.Tensor:
        return nam_scores(candidates.text_keys, candidates.keys, candidates.num_heads)


@register_bank_policy("nam_no_sink")
class NarrativeAdaptiveMemoryWithoutSink(NarrativeAdaptiveMemory):
    """NAM whose bank never spends a slot on a frame the sink already holds: a chunk that starts
    in the sink (the first, with the reference's 3-frame sink) stages nothing."""

    admits_sink_frames = False
