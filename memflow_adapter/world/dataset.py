"""Write narrative-world scripts as a ``memory_finetune`` dataset (``recipes/README.md``):
one ``memflow-latents-v1`` file per script, latents from the world's autoencoder, prompt
embeddings from its text encoder::

    python -m memflow_adapter.world.dataset --output data/world --videos 3000 --first-seed 1000

Seeds below 1000 are kept for evaluation (``bench/narrative_eval.py`` uses 0 ..).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..recipes.latents import VideoLatents
from .grammar import make_script
from .pipeline import WORLD_SEQUENCE_LENGTH, NarrativeWorldPipeline, build_world_pipeline
from .render import render_script

#: The first training seed: evaluation scripts use seeds below it.
FIRST_TRAINING_SEED = 1000


def script_sample(pipe: NarrativeWorldPipeline, seed: int) -> VideoLatents:
    """Script ``seed`` as a training video: latents ``[12, 24, 16, 16]``, six prompt
    embeddings ``[6, 16, 64]``, segment starts ``[0, 4, .., 20]``."""
    script = make_script(seed)
    video = render_script(script).transpose(0, 1)[None]
    latents = pipe.vae.encode_normalised(video)[0]
    embeds, _ = pipe.encode_prompt(script.prompts, max_sequence_length=WORLD_SEQUENCE_LENGTH)
    return VideoLatents(
        latents, embeds, torch.tensor(script.segment_starts), tuple(script.prompts)
    )


def write_dataset(output: Path, videos: int, first_seed: int = FIRST_TRAINING_SEED) -> Path:
    if videos < 1:
        raise ValueError(f"videos must be >= 1, got {videos}")
    if first_seed < FIRST_TRAINING_SEED:
        raise ValueError(
            f"first_seed must be >= {FIRST_TRAINING_SEED} (lower seeds are evaluation scripts), "
            f"got {first_seed}"
        )
    pipe = build_world_pipeline()
    for seed in tqdm(range(first_seed, first_seed + videos), desc="world scripts"):
        script_sample(pipe, seed).save(output / f"script-{seed:07d}.safetensors")
    return output


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m memflow_adapter.world.dataset",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="the dataset folder")
    parser.add_argument("--videos", type=int, default=3000, help="how many scripts")
    parser.add_argument("--first-seed", type=int, default=FIRST_TRAINING_SEED)
    args = parser.parse_args(argv)
    return write_dataset(args.output, args.videos, args.first_seed)


if __name__ == "__main__":
    main()
