"""Validation rollouts: a short streaming generation with the student being trained.

Each one writes ``output_dir/validation/step-<step>/``: ``latents.safetensors`` (``latents``
``[B, C, F, h, w]``), and either ``video.mp4`` + ``memory_timeline.png`` + ``report.json`` (with
``decode``) or ``report.json`` alone; the report holds the per-chunk memory trace (bank frames,
SMA activations, latency, cache size).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

from integrations import reference_integration
from memflow_adapter import MemFlowConfig, MemFlowStreamingPipeline
from memflow_adapter.outputs import memory_report, write_outputs
from memflow_adapter.schedule import FlowMatchSchedule

from .config import check

#: The video a validation rollout makes unless configured: the reference family's.
_REFERENCE_VIDEO = reference_integration().default_video


@dataclass(frozen=True)
class ValidationConfig:
    """A validation rollout every ``every_steps`` steps (0: never) and after the last step.

    Args:
        prompts: the prompts, one every ``frames_per_prompt`` latent frames.
        num_latent_frames, height, width: the video (height and width in pixels; default: the
            reference family's, as ``max_sequence_length``).
        decode: decode with the VAE and write an mp4 (else latents and the report only).
    """

    every_steps: int = 0
    prompts: tuple[str, ...] = ("a red fox walks through a snowy forest",)
    frames_per_prompt: int = 12
    num_latent_frames: int = 12
    height: int = _REFERENCE_VIDEO.height
    width: int = _REFERENCE_VIDEO.width
    decode: bool = True
    fps: int = 16
    seed: int = 0
    max_sequence_length: int = _REFERENCE_VIDEO.max_sequence_length

    def __post_init__(self) -> None:
        check(self.every_steps >= 0, "every_steps", "an int >= 0", self.every_steps)
        check(len(self.prompts) >= 1, "prompts", "a list of at least one prompt", self.prompts)
        for name in ("frames_per_prompt", "num_latent_frames", "height", "width", "fps"):
            check(getattr(self, name) >= 1, name, "an int >= 1", getattr(self, name))
        check(self.max_sequence_length >= 1, "max_sequence_length", "an int >= 1",
              self.max_sequence_length)

    def due(self, step: int, max_steps: int) -> bool:
        return self.every_steps > 0 and (step % self.every_steps == 0 or step == max_steps)


def run_validation(
    config: ValidationConfig,
    pipe: DiffusionPipeline,
    memflow: MemFlowConfig,
    schedule: FlowMatchSchedule,
    folder: Path,
    device: torch.device,
    write: bool = True,
) -> Path:
    """Generate with ``pipe`` (its transformer is the student, MemFlow attached with
    ``memflow``); write the artefacts into ``folder`` when ``write`` (the processes of a sharded
    run all generate, one writes)."""
    streaming = MemFlowStreamingPipeline(pipe, memflow, schedule, device=device)
    result = streaming(
        list(config.prompts),
        num_latent_frames=config.num_latent_frames,
        height=config.height,
        width=config.width,
        frames_per_prompt=config.frames_per_prompt,
        generator=torch.Generator().manual_seed(config.seed),
        output_type="np" if config.decode else "latent",
        max_sequence_length=config.max_sequence_length,
        fps=config.fps,
        progress=False,
    )
    if not write:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"latents": result.latents.cpu().contiguous()}, folder / "latents.safetensors")
    extra = {"prompts": list(config.prompts)}
    if config.decode:
        write_outputs(result, memflow, folder, config.fps, extra)
    else:
        report = {**extra, "chunks": memory_report(result)}
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return folder
