"""Write narrative-world scripts as a ``memory_finetune`` dataset (``recipes/README.md``):
one ``memflow-latents-v1`` file per script, latents from the world's autoencoder, prompt
embeddings from its text encoder::

    python -m memflow_apps.world.dataset --output data/world --videos 3000 --first-seed 1000

(``--edition v2`` for the second world edition, ``grammar.EDITIONS``)

and, for ``streaming_long_tuning`` (which generates its own videos from prompts), the scripts'
six prompts as a prompt-group file (one ``{"id": ..., "prompts": [...]}`` line per script)::

    python -m memflow_apps.world.dataset --prompts data/world_prompts.jsonl --videos 3000

Seeds below 1000 are kept for evaluation (``bench/narrative_eval.py`` uses 0 ..).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memflow_apps.shared.latents import VideoLatents

from .grammar import DEFAULT_EDITION, EDITIONS, make_script
from .pipeline import WORLD_SEQUENCE_LENGTH, NarrativeWorldPipeline, build_world_pipeline
from .render import render_script

#: The first training seed: evaluation scripts use seeds below it.
FIRST_TRAINING_SEED = 1000


def script_sample(
    pipe: NarrativeWorldPipeline, seed: int, edition: str = DEFAULT_EDITION
) -> VideoLatents:
    """Script ``seed`` of world ``edition`` as a training video: latents ``[12, 24, 16, 16]``,
    six prompt embeddings ``[6, 16, 64]``, segment starts ``[0, 4, .., 20]``."""
    script = make_script(seed, edition)
    video = render_script(script).transpose(0, 1)[None]
    latents = pipe.vae.encode_normalised(video)[0]
    embeds, _ = pipe.encode_prompt(script.prompts, max_sequence_length=WORLD_SEQUENCE_LENGTH)
    return VideoLatents(
        latents, embeds, torch.tensor(script.segment_starts), tuple(script.prompts)
    )


def write_dataset(
    output: Path, videos: int, first_seed: int = FIRST_TRAINING_SEED,
    edition: str = DEFAULT_EDITION,
) -> Path:
    _check_training_seeds(videos, first_seed)
    pipe = build_world_pipeline()
    for seed in tqdm(range(first_seed, first_seed + videos), desc="world scripts"):
        script_sample(pipe, seed, edition).save(output / f"script-{seed:07d}.safetensors")
    return output


def write_prompt_groups(
    path: Path, videos: int, first_seed: int = FIRST_TRAINING_SEED,
    edition: str = DEFAULT_EDITION,
) -> Path:
    """Scripts ``first_seed ..`` as a JSONL prompt-group file (``memflow_apps.shared.prompts``):
    each line ``{"id": "script-0001000", "prompts": [six prompts]}``."""
    _check_training_seeds(videos, first_seed)
    lines = [
        json.dumps({"id": f"script-{seed:07d}", "prompts": make_script(seed, edition).prompts})
        for seed in range(first_seed, first_seed + videos)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _check_training_seeds(videos: int, first_seed: int) -> None:
    if videos < 1:
        raise ValueError(f"videos must be >= 1, got {videos}")
    if first_seed < FIRST_TRAINING_SEED:
        raise ValueError(
            f"first_seed must be >= {FIRST_TRAINING_SEED} (lower seeds are evaluation scripts), "
            f"got {first_seed}"
        )


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m memflow_apps.world.dataset",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, help="the dataset folder (latents)")
    parser.add_argument("--prompts", type=Path,
                        help="write the scripts' prompts as this JSONL prompt-group file instead")
    parser.add_argument("--videos", type=int, default=3000, help="how many scripts")
    parser.add_argument("--first-seed", type=int, default=FIRST_TRAINING_SEED,
                        help=f"the first script's seed (>= {FIRST_TRAINING_SEED})")
    parser.add_argument("--edition", choices=sorted(EDITIONS), default=DEFAULT_EDITION,
                        help="the world edition the scripts are drawn in (default: "
                             f"{DEFAULT_EDITION})")
    args = parser.parse_args(argv)
    if (args.output is None) == (args.prompts is None):
        parser.error("give one of --output (a latent dataset) or --prompts (a prompt file)")
    if args.prompts is not None:
        return write_prompt_groups(args.prompts, args.videos, args.first_seed, args.edition)
    return write_dataset(args.output, args.videos, args.first_seed, args.edition)


if __name__ == "__main__":
    main()
