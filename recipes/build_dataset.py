"""Build a ``memory_finetune`` dataset: videos + their segment prompts -> latents + embeddings.

A manifest (JSONL) lists the videos, one JSON object per line::

    {"video": "clips/fox.mp4", "prompts": ["a fox walks ...", "the fox jumps ..."],
     "segment_starts": [0.0, 5.0], "id": "fox"}

``video`` is relative to the manifest's folder; ``segment_starts`` (optional) are the seconds where
each prompt's segment starts (default: equal parts); ``id`` (optional) names the output file
(default: the video's stem). Each video is read with imageio/PyAV, resampled to ``--fps``, resized
and centre-cropped to ``--height`` x ``--width`` (diffusers' video processor; default: the
family's video, ``Integration.default_video``), cut to ``c k + 1`` frames (``c`` the VAE's
temporal factor, ``Integration.vae_temporal_factor``), encoded with the pipeline's VAE (the
latent mean) and normalised as the pipeline does; the prompts are encoded with its text
encoder. Everything runs offline from a local pipeline folder::

    python -m recipes.build_dataset --pipeline ./Wan2.1-T2V-1.3B-Diffusers \\
        --manifest videos.jsonl --output data/latents --height 480 --width 832 --fps 16
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from integrations import find_integration
from memflow_adapter.extras import import_optional
from memflow_apps.shared.latents import DatasetError, VideoLatents
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline
from memflow_apps.shared.videos import iter_video_batches

from .training import exit_on_bad_input


@dataclass(frozen=True)
class ManifestEntry:
    video: Path
    prompts: tuple[str, ...]
    segment_starts: tuple[float, ...] | None
    name: str


def read_manifest(path: Path) -> list[ManifestEntry]:
    """The manifest's entries (errors name the line)."""
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{where}: not JSON ({error})") from error
        prompts = item.get("prompts") if isinstance(item, dict) else None
        if not isinstance(item.get("video"), str) or not isinstance(prompts, list) or not prompts:
            raise DatasetError(f"{where}: needs a 'video' path and a non-empty 'prompts' list")
        starts = item.get("segment_starts")
        if starts is not None and len(starts) != len(prompts):
            raise DatasetError(f"{where}: {len(starts)} segment_starts for {len(prompts)} prompts")
        video = path.parent / item["video"]
        entries.append(
            ManifestEntry(
                video,
                tuple(prompts),
                None if starts is None else tuple(float(s) for s in starts),
                str(item.get("id", video.stem)),
            )
        )
    return entries


def read_frames(
    path: Path, fps: float, max_frames: int, temporal_factor: int
) -> list[PIL.Image.Image]:
    """The video resampled to ``fps`` (nearest earlier frame), cut to ``c k + 1`` frames (``c``:
    ``temporal_factor``), at most ``max_frames``; a missing or undecodable file raises
    ``VideoReadError``."""
    frames = np.concatenate(list(iter_video_batches(path)))
    iio = import_optional("imageio.v3", "video", "reading training videos")
    source_fps = float(iio.immeta(path, plugin="pyav")["fps"])
    count = min(max_frames, int(len(frames) * fps / source_fps))
    count = (count - 1) // temporal_factor * temporal_factor + 1
    if count < 1:
        raise DatasetError(f"{path}: no frame at {fps} fps")
    indices = [min(len(frames) - 1, int(i * source_fps / fps)) for i in range(count)]
    return [PIL.Image.fromarray(frames[i]) for i in indices]


def latent_segment_starts(
    starts_seconds: Sequence[float] | None,
    num_prompts: int,
    fps: float,
    num_latent_frames: int,
    temporal_factor: int,
) -> list[int]:
    """Segment starts in latent frames: under a causal VAE of temporal factor ``c`` (latent frame 0
    is pixel frame 0, latent frame ``k >= 1`` covers pixel frames ``c k - c + 1 .. c k``), a
    segment starting at pixel frame ``p`` starts at the first latent frame covering it,
    ``ceil(p / c)``; without times, equal parts."""
    if starts_seconds is None:
        return [s * num_latent_frames // num_prompts for s in range(num_prompts)]
    return [-(-round(seconds * fps) // temporal_factor) for seconds in starts_seconds]


@torch.no_grad()
def encode_video(
    pipe: DiffusionPipeline, frames: list[PIL.Image.Image], height: int, width: int
) -> torch.Tensor:
    """``[C, F, h, w]`` normalised latents (the VAE's mean) of ``frames``."""
    vae = pipe.vae
    video = pipe.video_processor.preprocess_video(frames, height, width, resize_mode="crop")
    latents = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode()
    channels = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(channels).to(latents)
    std = torch.tensor(vae.config.latents_std).view(channels).to(latents)
    return ((latents - mean) / std)[0].float().cpu()


@torch.no_grad()
def build_sample(
    pipe: DiffusionPipeline, entry: ManifestEntry, args: argparse.Namespace
) -> VideoLatents:
    factor = find_integration(pipe.transformer).vae_temporal_factor
    latents = encode_video(
        pipe, read_frames(entry.video, args.fps, args.max_frames, factor), args.height, args.width
    )
    embeds, _ = pipe.encode_prompt(
        list(entry.prompts),
        do_classifier_free_guidance=False,
        max_sequence_length=args.max_sequence_length,
        device=pipe.text_encoder.device,
    )
    starts = latent_segment_starts(
        entry.segment_starts, len(entry.prompts), args.fps, latents.shape[1], factor
    )
    return VideoLatents(
        latents, embeds.float().cpu(), torch.tensor(starts, dtype=torch.int64), entry.prompts
    )


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.build_dataset",
        description="Encode videos and their segment prompts into a memory_finetune dataset.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pipeline", help="a diffusers pipeline folder (or Hub id)")
    source.add_argument("--tiny", action="store_true", help="the tiny random pipeline (tests)")
    parser.add_argument("--manifest", type=Path, required=True, help="JSONL, one video per line")
    parser.add_argument("--output", type=Path, required=True, help="the dataset folder")
    parser.add_argument("--height", type=int, help="pixels (default: the family's)")
    parser.add_argument("--width", type=int, help="pixels (default: the family's)")
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument("--max-frames", type=int, default=481, help="pixel frames per video")
    parser.add_argument("--max-sequence-length", type=int,
                        help="text tokens per prompt (default: the family's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    pipe = (
        build_tiny_wan_pipeline()
        if args.tiny
        else DiffusionPipeline.from_pretrained(args.pipeline, dtype=dtype)
    )
    video = find_integration(pipe.transformer).default_video
    for name in ("height", "width", "max_sequence_length"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(video, name))
    pipe.vae.to(args.device)
    pipe.text_encoder.to(args.device)
    written = []
    for entry in tqdm(read_manifest(args.manifest), desc="videos"):
        written.append(
            build_sample(pipe, entry, args).save(args.output / f"{entry.name}.safetensors")
        )
    return written


if __name__ == "__main__":
    exit_on_bad_input("build_dataset", main)
