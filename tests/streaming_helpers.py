"""Test helpers: one tiny geometry, frame-coded tokens and a driver for the chunk lifecycle."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from memflow_adapter import StreamingSession

# One tiny geometry for the whole suite: batch 2, 4 tokens per frame, 2 heads of width 8.
BATCH, TOKENS, HEADS, DIM = 2, 4, 2, 8


def frame_coded(start_frame: int, num_frames: int, batch: int = BATCH) -> torch.Tensor:
    """``[B, n * T, H, D]`` tokens whose every entry equals the absolute index of its frame."""
    frames = torch.arange(start_frame, start_frame + num_frames, dtype=torch.float32)
    return (
        frames.repeat_interleave(TOKENS)[None, :, None, None].expand(batch, -1, HEADS, DIM).clone()
    )


def frames_of(tokens: torch.Tensor) -> list[int]:
    """Inverse of ``frame_coded`` for batch element 0, head 0."""
    return [int(v) for v in tokens[0, ::TOKENS, 0, 0].tolist()]


def random_tokens(generator: torch.Generator, num_frames: int, batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, num_frames * TOKENS, HEADS, DIM, generator=generator)


QKV = Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def run_chunk(
    session: StreamingSession,
    qkv: QKV,
    text_keys: Sequence[torch.Tensor] | None = None,
    denoise_passes: int = 0,
) -> list[torch.Tensor]:
    """One chunk: begin, ``denoise_passes`` read-only passes, then the context pass.

    ``qkv(layer, start_frame, num_frames)`` supplies each layer's tokens; returns the context
    pass's output of every layer.
    """
    start, frames = session.next_frame, session.config.frames_per_chunk
    session.begin_chunk(text_keys)
    for _ in range(denoise_passes):
        with session.denoise_pass():
            for layer in range(session.num_layers):
                session.attend(layer, *qkv(layer, start, frames))
    with session.context_pass():
        return [
            session.attend(layer, *qkv(layer, start, frames)) for layer in range(session.num_layers)
        ]


def coded_qkv(layer: int, start: int, frames: int):
    tokens = frame_coded(start, frames)
    return tokens, tokens, tokens
