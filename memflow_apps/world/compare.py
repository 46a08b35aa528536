"""``memflow compare`` on the narrative world: one world model streams the same held-out stories
under every memory (``memflow_apps.shared.memories``), side by side in one run. Per memory: the
world's scores (``scoring``), the retrieval score (at the chunk where the entity returns, the
share of layers whose bank holds a frame of its first appearance: it needs no good generator),
the time per chunk and the cache's size."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from memflow_apps.shared.memories import Column, memory_config, report_comparison

from .grammar import make_script
from .pipeline import WORLD_MEMORY, WORLD_STUDENT_DIR, NarrativeWorldPipeline, load_world_pipeline
from .scoring import generate_script, mean_scores, return_retrieval, score_script, streaming_with

COLUMNS = (
    Column("retrieval", "retrieval", "percent"),
    Column("return_looks", "return = first look", "percent"),
    Column("return_colour", "colour", "percent"),
    Column("first_looks", "first drawn as prompted", "percent"),
    Column("adherence", "adherence", "percent"),
    Column("seconds_per_chunk", "ms / chunk", "ms"),
    Column("cache_bytes", "cache KiB", "kib"),
)
PLOTTED = COLUMNS[:2]


def compare_on_world(
    pipe: NarrativeWorldPipeline,
    memories: Sequence[str],
    seeds: Sequence[int],
    guidance_scale: float | None = None,
) -> list[dict[str, Any]]:
    """One row per memory: its scores averaged over the stories of ``seeds`` (of the model's
    world edition), the mean retrieval score, the mean seconds per chunk and the cache's
    largest size in bytes."""
    scripts = {seed: make_script(seed, pipe.sampling.edition) for seed in seeds}
    rows = []
    for name in memories:
        streaming = streaming_with(pipe, memory_config(WORLD_MEMORY, name))
        scores, retrieval, cache_bytes = [], [], 0
        for seed, script in scripts.items():
            generated = generate_script(streaming, script, seed, guidance_scale)
            scores.append(score_script(script, generated.video, generated.chunk_seconds))
            retrieval.append(return_retrieval(script, generated.output.trace))
            cache_bytes = max(cache_bytes, *(c.cache_bytes for c in generated.output.chunks))
        rows.append({"memory": name, **mean_scores(scores),
                     "retrieval": statistics.mean(retrieval), "cache_bytes": cache_bytes})
    return rows


def run(
    model: str | Path,
    memories: Sequence[str],
    seeds: range,
    output_dir: Path,
    guidance_scale: float | None = None,
) -> dict[str, Path]:
    """``compare_on_world`` with the world model in the folder ``model``, printed and written by
    ``report_comparison``."""
    pipe = load_world_pipeline(model)
    guidance = pipe.sampling.guidance_scale if guidance_scale is None else guidance_scale
    rows = compare_on_world(pipe, memories, seeds, guidance)
    steps = len(pipe.sampling.schedule.steps)
    title = (f"{len(seeds)} narrative-world stories (seeds {seeds.start}..{seeds.stop - 1}, "
             f"edition {pipe.sampling.edition}), {steps} sampling steps at guidance "
             f"{guidance:g}, layout {WORLD_MEMORY.describe()}, {torch.get_num_threads()} CPU "
             "threads; rates in %")
    details = {"seeds": [seeds.start, seeds.stop], "model": str(model),
               "guidance_scale": guidance}
    return report_comparison(rows, COLUMNS, PLOTTED, title, output_dir, details)


def run_command(args: argparse.Namespace) -> int:
    """``memflow compare`` without ``--prompts``: the world's comparison."""
    seeds = range(args.first_seed, args.first_seed + args.stories)
    if args.stories < 1 or seeds.start < 0 or seeds.stop > 1000:
        raise ValueError(f"--first-seed and --stories must pick seeds in 0..999 (held out), got "
                         f"{seeds.start}..{seeds.stop - 1}")
    for name in args.memories:
        memory_config(WORLD_MEMORY, name)  # a bad name fails before the model loads
    model = args.world_model or WORLD_STUDENT_DIR
    paths = run(model, args.memories, seeds, Path(args.output_dir), args.guidance_scale)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
