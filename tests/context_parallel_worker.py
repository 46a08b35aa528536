"""One rank of a context-parallel stream (``torchrun --nproc_per_node N``) or the single-process
run it is compared with (plain ``python``): streams the tiny Wan with a prompt switch and saves
what the tests compare to ``OUT/<preset>-rank<r>-of-<N>.pt``.

``python tests/context_parallel_worker.py OUT PRESET [PRESET ...]``
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from memflow_adapter import MemFlowConfig, MemFlowStreamingPipeline, remove_memflow
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

PROMPTS = [
    "a red fox runs through the snow",
    "a blue whale swims in the dark sea",
    "the red fox sleeps under a tree",
]
FRAMES_PER_PROMPT = 18  # switches at chunks 6 and 12; NAM selects from a full bank from chunk 10
NUM_LATENT_FRAMES = 48
HEIGHT = WIDTH = 64  # 8x8 latents: 16 tokens per frame, split evenly over 2 ranks


PAUSE_AFTER = 11  # chunks streamed before a pause (NAM has selected); the rest after resuming


def stream(preset: str, world: int) -> dict[str, object]:
    pipeline = MemFlowStreamingPipeline(
        build_tiny_wan_pipeline(0), MemFlowConfig.preset(preset), device="cpu",
        ulysses_degree=world,
    )

    def start():
        return pipeline.stream(
            PROMPTS, NUM_LATENT_FRAMES, HEIGHT, WIDTH, frames_per_prompt=FRAMES_PER_PROMPT,
            generator=torch.Generator().manual_seed(7), output_type="latent",
        )

    video = start()
    chunks = list(video)
    paused = start()
    before = [next(paused) for _ in range(PAUSE_AFTER)]
    resumed = start()
    resumed.load_state_dict(paused.state_dict())
    after = list(resumed)
    remove_memflow(pipeline.transformer)
    return {
        "detached_forward": plain_forward(pipeline.transformer),
        "latents": torch.cat([chunk.latents for chunk in chunks], dim=2),
        "resumed_latents": torch.cat([chunk.latents for chunk in before + after], dim=2),
        "bank": [chunk.memory.bank for chunk in chunks],
        "recached": [chunk.plan.recache for chunk in chunks],
        "cached_heads": video.session.layers[0].geometry.num_heads,
        "cache_bytes": video.session.cache_bytes,
        "session_state": video.session.state_dict(),
    }


@torch.no_grad()
def plain_forward(transformer: torch.nn.Module) -> torch.Tensor:
    """A bidirectional forward over fixed inputs, as diffusers computes it (with or without
    context parallelism)."""
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 16, 3, HEIGHT // 8, WIDTH // 8, generator=generator)
    embeds = torch.randn(1, 16, transformer.config.text_dim, generator=generator)
    return transformer(
        hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=embeds,
        return_dict=False,
    )[0]


def main(out: Path, presets: list[str]) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    rank = int(os.environ.get("RANK", "0"))
    for preset in presets:
        torch.save(stream(preset, world), out / f"{preset}-rank{rank}-of-{world}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
