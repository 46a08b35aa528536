"""Generating the benchmark's videos, resumably: every (configuration, prompt group) video not
already finished (``markers``) is streamed into ``videos/<config>/<group id>.mp4``."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm.auto import tqdm

from memflow_adapter.config import MemFlowConfig
from memflow_apps.shared.prompts import PromptGroup
from memflow_apps.shared.videos import PARTIAL

from .entries import GENERATION_FAILED, VideoEntry
from .markers import MARKER_KEYS, read_marker, settings_of, video_file, write_json
from .protocol import EvalProtocol

__all__ = ["generate_videos"]


def generate_videos(
    groups: Sequence[PromptGroup],
    config_names: Sequence[str],
    output_dir: str | os.PathLike[str],
    protocol: EvalProtocol,
    pipe_factory: Callable[[], Any],
    model: str,
    device: str | torch.device | None = None,
    progress: bool = True,
    log: TextIO | None = None,
) -> list[VideoEntry]:
    """Generate every (configuration, group) video not already finished; return the entries.

    Args:
        pipe_factory: builds the diffusers pipeline (called once, and only when some video is
            to be generated); each configuration attaches its memory to the same pipeline.
        model: recorded in the markers (a changed model regenerates the videos).
        device: where to generate (default: CUDA when available).
    """
    from memflow_adapter.hooks import get_memflow, remove_memflow
    from memflow_adapter.pipeline import MemFlowStreamingPipeline

    log = log or sys.stderr
    output_dir = Path(output_dir)
    entries: list[VideoEntry] = []
    pending: list[tuple[VideoEntry, dict[str, Any]]] = []
    for config_name in config_names:
        frames_per_chunk = MemFlowConfig.preset(config_name).frames_per_chunk
        protocol.check(groups, frames_per_chunk)
        for group in groups:
            path = video_file(output_dir, config_name, group)
            settings = settings_of(group, config_name, model, protocol)
            entry = VideoEntry(
                config_name,
                group.id,
                group,
                path,
                frames_per_chunk=frames_per_chunk,
                num_latent_frames=settings["num_latent_frames"],
                frames_per_prompt=protocol.frames_per_prompt,
            )
            entries.append(entry)
            marker = read_marker(path)
            done = path.is_file() and marker is not None and marker.get("complete") is True
            if done and all(marker.get(key) == settings[key] for key in MARKER_KEYS):
                continue
            if done:
                print(
                    f"memflow eval: {config_name}/{group.id}: settings changed, regenerating",
                    file=log,
                )
            pending.append((entry, settings))
    skipped = len(entries) - len(pending)
    if skipped:
        print(f"memflow eval: {skipped} finished video(s) skipped (resume)", file=log)
    if not pending:
        return entries

    pipe = pipe_factory()
    bar = tqdm(total=len(pending), desc="memflow eval: generating", disable=not progress)
    streaming = None
    try:
        for config_name in config_names:
            jobs = [(e, s) for e, s in pending if e.config == config_name]
            if not jobs:
                continue
            if get_memflow(pipe.transformer) is not None:
                remove_memflow(pipe.transformer)
            streaming = MemFlowStreamingPipeline(
                pipe, MemFlowConfig.preset(config_name), device=device
            )
            for entry, settings in jobs:
                bar.set_postfix_str(f"{config_name}/{entry.video}")
                try:
                    _generate_one(streaming, entry, settings)
                except Exception as error:  # one failure (e.g. out of memory) spares the rest
                    entry.status = GENERATION_FAILED
                    entry.message = f"{type(error).__name__}: {error}"
                    print(f"memflow eval: {config_name}/{entry.video}: generation failed: "
                          f"{entry.message}", file=log)
                bar.update(1)
    finally:
        bar.close()
        if streaming is not None and get_memflow(pipe.transformer) is not None:
            remove_memflow(pipe.transformer)
        del pipe, streaming
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the scoring models come next
    return entries


def _generate_one(streaming: Any, entry: VideoEntry, settings: dict[str, Any]) -> None:
    from memflow_adapter.pipeline import PromptSchedule

    assert entry.path is not None and entry.group is not None
    entry.path.parent.mkdir(parents=True, exist_ok=True)
    entry.path.with_suffix(".json").unlink(missing_ok=True)
    began = time.perf_counter()
    generator = torch.Generator(device=streaming.device).manual_seed(settings["seed"])
    result = streaming(
        PromptSchedule.from_prompts(entry.group.prompts, settings["frames_per_prompt"]),
        num_latent_frames=settings["num_latent_frames"],
        height=settings["height"],
        width=settings["width"],
        generator=generator,
        max_sequence_length=settings["max_sequence_length"],
        progress=False,
    )
    partial = entry.path.with_name(entry.path.stem + PARTIAL + entry.path.suffix)
    result.save_video(partial, fps=settings["fps"])
    os.replace(partial, entry.path)
    seconds = [chunk.seconds for chunk in result.chunks]
    write_json(
        entry.path.with_suffix(".json"),
        {
            **settings,
            "num_frames": int(result.frames.shape[1]),
            "seconds": round(time.perf_counter() - began, 3),
            "mean_chunk_seconds": round(sum(seconds) / len(seconds), 4),
            "complete": True,
        },
    )
