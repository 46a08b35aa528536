"""The training data of ``memory_finetune``: one safetensors file per video (see README.md).

Tensors:

* ``latents`` ``[C, F, h, w]``: the video's VAE latents, normalised as the Wan pipelines feed
  them to the transformer (``(z - latents_mean) / latents_std`` per channel);
* ``prompt_embeds`` ``[S, L, D]``: one text-encoder embedding per prompt segment (as
  ``WanPipeline.encode_prompt`` returns them, padded to ``L`` tokens);
* ``segment_starts`` ``[S]`` int64: the latent frame where each segment starts (the first 0,
  strictly increasing, each below ``F``).

Metadata (safetensors' string header): ``format`` (``memflow-latents-v1``) and ``prompts`` (a
JSON list of the segments' texts, for reference).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "memflow-latents-v1"
SUFFIX = ".safetensors"


class DatasetError(ValueError):
    """A dataset file that does not follow the format; names the file and the entry."""


@dataclass(frozen=True)
class VideoLatents:
    """One training video: ``latents`` ``[C, F, h, w]``, ``prompt_embeds`` ``[S, L, D]``,
    ``segment_starts`` ``[S]`` (latent frames), ``prompts`` (``S`` texts, may be empty)."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    segment_starts: torch.Tensor
    prompts: tuple[str, ...] = ()

    def validate(self, source: str) -> None:
        def fail(message: str) -> None:
            raise DatasetError(f"{source}: {message}")

        if self.latents.ndim != 4:
            fail(f"latents must be [C, F, h, w], got shape {tuple(self.latents.shape)}")
        if self.prompt_embeds.ndim != 3:
            fail(f"prompt_embeds must be [S, L, D], got shape {tuple(self.prompt_embeds.shape)}")
        starts = self.segment_starts
        if starts.ndim != 1 or starts.dtype != torch.int64:
            fail(f"segment_starts must be [S] int64, got {starts.dtype} {tuple(starts.shape)}")
        if len(starts) != len(self.prompt_embeds):
            fail(
                f"segment_starts has {len(starts)} entries, prompt_embeds {len(self.prompt_embeds)}"
            )
        values = starts.tolist()
        num_frames = self.latents.shape[1]
        increasing = all(a < b for a, b in zip(values, values[1:], strict=False))
        if not values or values[0] != 0 or not increasing:
            fail(f"segment_starts must start at 0 and increase strictly, got {values}")
        if values[-1] >= num_frames:
            fail(f"segment_starts {values} must be below the {num_frames} latent frames")
        if self.prompts and len(self.prompts) != len(values):
            fail(f"metadata has {len(self.prompts)} prompts for {len(values)} segments")
        if not torch.isfinite(self.latents).all() or not torch.isfinite(self.prompt_embeds).all():
            fail("latents and prompt_embeds must be finite")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        self.validate(str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "latents": self.latents.contiguous(),
            "prompt_embeds": self.prompt_embeds.contiguous(),
            "segment_starts": self.segment_starts.contiguous(),
        }
        save_file(tensors, path, metadata={"format": FORMAT, "prompts": json.dumps(self.prompts)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> VideoLatents:
        path = Path(path)
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                missing = [
                    key
                    for key in ("latents", "prompt_embeds", "segment_starts")
                    if key not in handle.keys()  # noqa: SIM118 (safe_open has no __contains__)
                ]
                if missing:
                    raise DatasetError(f"{path}: missing tensors {missing}")
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as error:
            raise DatasetError(f"{path}: not a readable safetensors file ({error})") from error
        sample = cls(
            tensors["latents"],
            tensors["prompt_embeds"],
            tensors["segment_starts"],
            _header_prompts(metadata, path),
        )
        sample.validate(str(path))
        return sample


class LatentVideoDataset(Sequence[VideoLatents]):
    """The ``*.safetensors`` files of a folder, in name order, loaded on access."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DatasetError(f"dataset folder {str(self.folder)!r} does not exist")
        self.files = sorted(self.folder.glob(f"*{SUFFIX}"))
        if not self.files:
            raise DatasetError(f"dataset folder {str(self.folder)!r} holds no *{SUFFIX} file")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> VideoLatents:  # type: ignore[override]
        return VideoLatents.load(self.files[index])

    def segment_prompts(self, index: int) -> tuple[str, ...]:
        """Video ``index``'s prompt texts, one per segment, read from its header and its
        ``segment_starts`` alone (not its latents); a video without them is refused."""
        path = self.files[index]
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                segments = len(handle.get_tensor("segment_starts"))
        except (SafetensorError, OSError) as error:
            raise DatasetError(f"{path}: not a readable latent video ({error})") from error
        prompts = _header_prompts(metadata, path)
        if len(prompts) != segments:
            raise DatasetError(
                f"{path}: holds {len(prompts)} prompt texts (metadata 'prompts') for its "
                f"{segments} segments; the prompts are needed, one per segment"
            )
        return prompts


def _header_prompts(metadata: dict[str, str], path: Path) -> tuple[str, ...]:
    """The prompt texts of a latent video's safetensors header, checked to be this format's."""
    if metadata.get("format") != FORMAT:
        raise DatasetError(
            f"{path}: metadata format is {metadata.get('format')!r}, expected {FORMAT!r}"
        )
    return tuple(json.loads(metadata.get("prompts", "[]")))
