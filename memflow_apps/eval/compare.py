"""``memflow compare`` on any model with the benchmark's prompt groups: every memory
(``memflow_apps.shared.memories``) streams the same groups with one pipeline, side by side in one
run. Per memory: the benchmark's scores (``scoring.VideoScorer``), the retrieval score (at the
last segment's first chunk, the share of layers whose bank holds a frame of the first segment:
the groups' stories come back to their opening subject), the time per chunk and the cache's
size."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from memflow_adapter.config import MemFlowConfig
from memflow_adapter.hooks import get_memflow, remove_memflow
from memflow_adapter.pipeline import MemFlowStreamingPipeline, PromptSchedule
from memflow_apps.shared.cli_choices import TINY_RANDOM
from memflow_apps.shared.memories import Column, memory_config, report_comparison
from memflow_apps.shared.prompts import PromptGroup

from .protocol import EvalProtocol
from .report import VIDEO_SCORES
from .scoring import VideoScorer

COLUMNS = (
    Column("retrieval", "retrieval", "percent"),
    *(Column(name, name.replace("_", " "), "plain") for name in VIDEO_SCORES
      if name != "aesthetic_quality"),
    Column("seconds_per_chunk", "ms / chunk", "ms"),
    Column("cache_bytes", "cache KiB", "kib"),
)
PLOTTED = COLUMNS[:1]


def compare_on_groups(
    pipe: Any,
    memories: Sequence[str],
    groups: Sequence[PromptGroup],
    protocol: EvalProtocol,
    layout: MemFlowConfig,
    scorer: VideoScorer,
    device: str | torch.device | None = None,
) -> list[dict[str, Any]]:
    """One row per memory on ``layout`` (a config with a bank): the benchmark's video scores and
    the retrieval score averaged over ``groups`` (group ``i`` with seed ``protocol.seed + i``),
    the mean seconds per chunk and the cache's largest size in bytes."""
    protocol.check(groups, layout.frames_per_chunk)
    rows = []
    for name in memories:
        if get_memflow(pipe.transformer) is not None:
            remove_memflow(pipe.transformer)
        streaming = MemFlowStreamingPipeline(pipe, memory_config(layout, name), device=device)
        per_video: list[dict[str, float]] = []
        for group in groups:
            starts = protocol.latent_starts(len(group.prompts), layout.frames_per_chunk)
            frames = protocol.latent_frames(len(group.prompts))
            result = streaming(
                PromptSchedule(tuple(zip(group.prompts, starts, strict=True))),
                num_latent_frames=frames,
                height=protocol.height,
                width=protocol.width,
                generator=torch.Generator().manual_seed(protocol.seed + group.index),
                max_sequence_length=protocol.max_sequence_length,
                output_type="np",
                progress=False,
            )
            scores = scorer.score_frames([result.frames[0]], group.prompts, starts, frames,
                                         protocol.temporal_compression, protocol.boundary_frames)
            last = next(chunk for chunk in result.trace if chunk.start_frame == starts[-1])
            opening = range(starts[0], starts[1] if len(starts) > 1 else frames)
            per_video.append({
                **{score: getattr(scores, score) for score in VIDEO_SCORES},
                "retrieval": last.bank_recall(opening),
                "seconds_per_chunk": statistics.mean(c.seconds for c in result.chunks),
                "cache_bytes": max(c.cache_bytes for c in result.chunks),
            })
        rows.append({"memory": name, **_means(per_video)})
    if get_memflow(pipe.transformer) is not None:
        remove_memflow(pipe.transformer)
    return rows


def _means(per_video: Sequence[dict[str, float]]) -> dict[str, float | None]:
    means: dict[str, float | None] = {}
    for key in per_video[0]:
        values = [video[key] for video in per_video if video[key] is not None]
        if key == "cache_bytes":
            means[key] = max(values)
        else:
            means[key] = statistics.mean(values) if values else None
    return means


#: The tiny random-weight model's sizes (``memflow eval``'s).
_TINY_SIZES = {"height": 64, "width": 64, "max_sequence_length": 32}


def run_command(args: argparse.Namespace) -> int:
    """``memflow compare --prompts ...``: the prompt groups' comparison."""
    from memflow_apps.shared.prompts import load_prompt_groups
    from memflow_apps.shared.tiny_scorers import SAMPLE_PROMPTS, save_tiny_clip, save_tiny_dino

    from .cli import pipe_factory, scorer_model

    layout = MemFlowConfig.preset(args.preset)
    for name in args.memories:
        memory_config(layout, name)  # a bad name fails before anything loads
    groups = load_prompt_groups(SAMPLE_PROMPTS if args.prompts == "sample" else args.prompts)
    groups = groups[: args.limit] if args.limit else groups
    tiny = args.model == TINY_RANDOM
    protocol = EvalProtocol(frames_per_prompt=args.frames_per_prompt, seed=args.seed,
                            **(_TINY_SIZES if tiny else {}))
    protocol.check(groups, layout.frames_per_chunk)
    scorer = VideoScorer(
        clip=scorer_model(args.clip_model, save_tiny_clip, args.output_dir, "clip"),
        dino=scorer_model(args.dino_model, save_tiny_dino, args.output_dir, "dino"),
        device=args.device,
    )
    device = args.device or ("cpu" if tiny else None)
    pipe = pipe_factory(args.model, device, "auto")()
    rows = compare_on_groups(pipe, args.memories, groups, protocol, layout, scorer, device)
    title = (f"{len(groups)} prompt group(s), model {args.model}, layout {layout.describe()}, "
             f"{protocol.frames_per_prompt} latent frames per prompt at "
             f"{protocol.width}x{protocol.height}")
    details = {"model": args.model, "groups": [group.id for group in groups],
               "layout": layout.to_dict()}
    paths = report_comparison(rows, COLUMNS, PLOTTED, title, Path(args.output_dir), details)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
