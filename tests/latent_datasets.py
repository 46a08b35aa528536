"""Test helper: latent datasets of the recipes' on-disk format, drawn from one seeded generator."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from memflow_apps.shared.latents import VideoLatents


def write_latent_datasets(folder: Path, layouts: Sequence[tuple[int, Sequence[int]]]) -> Path:
    """One video per ``(frames, segment_starts)`` layout in ``folder``, in order (8x8 latents,
    tiny-pipeline-sized ``[16, 32]`` prompt embeddings); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for index, (frames, starts) in enumerate(layouts):
        VideoLatents(
            torch.randn(16, frames, 8, 8, generator=generator),
            torch.randn(len(starts), 16, 32, generator=generator),
            torch.tensor(starts),
            tuple(f"prompt {i}" for i in range(len(starts))),
        ).save(folder / f"{index}.safetensors")
    return folder
