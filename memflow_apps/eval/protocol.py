"""The benchmark's protocol: the videos' geometry and where each prompt's segment starts.

The public protocol is defined on the model MemFlow and LongLive were published on, so where it
does not say otherwise its video is the reference family's (``reference_integration()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from integrations import reference_integration
from memflow_apps.shared.prompts import PromptGroup

from .metrics import chunk_aligned_starts

__all__ = ["EvalProtocol"]

_REFERENCE = reference_integration()


@dataclass(frozen=True)
class EvalProtocol:
    """The benchmark's video geometry. Defaults are the public protocol: a prompt every 40 latent
    frames (10 s at 16 fps after the reference VAE's 4x temporal decoding), 6 prompts -> 240
    latent frames, at the reference family's video size (``Integration.default_video``).

    Attributes:
        frames_per_prompt: latent frames per prompt.
        num_latent_frames: video length in latent frames; ``None``: ``prompts * frames_per_prompt``.
        frames_per_chunk: the generator's chunk size for videos of unknown origin (the reference
            and LongLive: 3); a switch takes effect at the first chunk boundary at or after it.
            Generated videos use their configuration's chunk size.
        temporal_compression: decoded frames per latent frame after the first (the reference
            family's ``vae_temporal_factor``).
        boundary_frames: ``w`` of the cross-segment boundary similarity (16 = 1 s at 16 fps).
    """

    frames_per_prompt: int = 40
    num_latent_frames: int | None = None
    frames_per_chunk: int = 3
    temporal_compression: int = _REFERENCE.vae_temporal_factor
    height: int = _REFERENCE.default_video.height
    width: int = _REFERENCE.default_video.width
    fps: int = 16
    seed: int = 0
    max_sequence_length: int = _REFERENCE.default_video.max_sequence_length
    boundary_frames: int = 16

    def latent_frames(self, num_prompts: int) -> int:
        return self.num_latent_frames or num_prompts * self.frames_per_prompt

    def latent_starts(self, num_prompts: int, frames_per_chunk: int | None = None) -> list[int]:
        """Chunk-aligned first latent frame of each segment (``chunk_aligned_starts``)."""
        return chunk_aligned_starts(
            num_prompts,
            self.frames_per_prompt,
            self.latent_frames(num_prompts),
            frames_per_chunk or self.frames_per_chunk,
        )

    def check(self, groups: Sequence[PromptGroup], frames_per_chunk: int | None = None) -> None:
        """Raise ``ValueError`` when some group's prompts would not all be shown."""
        for group in groups:
            try:
                self.latent_starts(len(group.prompts), frames_per_chunk)
            except ValueError as error:
                raise ValueError(f"group {group.id!r}: {error}") from error
