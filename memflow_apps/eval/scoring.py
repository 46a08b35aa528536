"""Scoring videos: per-frame features (``VideoScorer``), each entry's per-video and per-segment
rows (``score_entry``), and a whole run scored and reported (``evaluate``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from tqdm.auto import tqdm

from memflow_apps.shared.videos import VideoReadError, iter_video_batches

from .entries import ERROR, MISSING, OK, UNREADABLE, VideoEntry
from .features import (
    DEFAULT_AESTHETIC_CLIP_MODEL,
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    AestheticPredictor,
    ClipFeatures,
    DinoFeatures,
    LinearAestheticPredictor,
    as_uint8_frames,
)
from .metrics import VideoScores, score_video_features, segment_ranges
from .protocol import EvalProtocol
from .report import SEGMENT_SCORES, VIDEO_SCORES, summarize, write_reports

__all__ = ["EvalResult", "VideoScorer", "evaluate", "score_entry"]


@dataclass
class EvalResult:
    """The tables of one evaluation and the files they were written to."""

    video_rows: list[dict[str, Any]]
    segment_rows: list[dict[str, Any]]
    summary_rows: list[dict[str, Any]]
    aesthetic: bool
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [row for row in self.video_rows if row["status"] != OK]


class VideoScorer:
    """Extracts per-frame features and computes the metrics; loads its models on first use.

    Args:
        clip: a CLIP Hub id / folder, or a ready :class:`ClipFeatures`.
        dino: a DINO Hub id / folder, or a ready :class:`DinoFeatures`.
        aesthetic: ``None`` (aesthetic quality is reported as absent), a LAION aesthetic-head
            state-dict file (scored on ``aesthetic_clip``'s embeddings), or a predictor.
        aesthetic_clip: the CLIP model of an aesthetic head file (the heads are ViT-L/14's).
        device: where the models run (default: CUDA when available).
        batch_size: frames per forward pass.
    """

    def __init__(
        self,
        clip: str | os.PathLike[str] | ClipFeatures = DEFAULT_CLIP_MODEL,
        dino: str | os.PathLike[str] | DinoFeatures = DEFAULT_DINO_MODEL,
        aesthetic: str | os.PathLike[str] | AestheticPredictor | None = None,
        aesthetic_clip: str | os.PathLike[str] = DEFAULT_AESTHETIC_CLIP_MODEL,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ) -> None:
        self._clip, self._dino, self._aesthetic = clip, dino, aesthetic
        self.aesthetic_clip = aesthetic_clip
        self.device = device
        self.batch_size = batch_size
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def has_aesthetic(self) -> bool:
        return self._aesthetic is not None

    @property
    def loaded(self) -> bool:
        return isinstance(self._clip, ClipFeatures) and isinstance(self._dino, DinoFeatures) and (
            self._aesthetic is None or callable(self._aesthetic)
        )

    def load(self) -> VideoScorer:
        """Load whatever was given by name (no-op once loaded)."""
        if not isinstance(self._clip, ClipFeatures):
            self._clip = ClipFeatures.from_pretrained(self._clip, self.device, self.batch_size)
        if not isinstance(self._dino, DinoFeatures):
            self._dino = DinoFeatures.from_pretrained(self._dino, self.device, self.batch_size)
        if self._aesthetic is not None and not callable(self._aesthetic):
            self._aesthetic = LinearAestheticPredictor.from_files(
                self._aesthetic, self.aesthetic_clip, self.device, self.batch_size
            )
        return self

    @property
    def clip(self) -> ClipFeatures:
        return self.load()._clip  # type: ignore[return-value]

    @property
    def dino(self) -> DinoFeatures:
        return self.load()._dino  # type: ignore[return-value]

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[n, D]`` CLIP text embeddings, each prompt encoded once per scorer."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            for prompt, row in zip(missing, self.clip.encode_texts(missing), strict=True):
                self._text_cache[prompt] = row
        return torch.stack([self._text_cache[p] for p in prompts])

    def frame_features(
        self, batches: Iterator[np.ndarray] | Sequence[np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-frame (DINO, CLIP image, aesthetic or ``None``) features of frame batches."""
        self.load()
        dino, clip, aesthetic = [], [], []
        for batch in batches:
            batch = as_uint8_frames(batch)
            dino.append(self.dino.encode_images(batch))
            clip.append(self.clip.encode_images(batch))
            if self._aesthetic is not None:
                aesthetic.append(torch.as_tensor(self._aesthetic(batch)).double().reshape(-1))
        if not dino:
            raise VideoReadError("no frames")
        return torch.cat(dino), torch.cat(clip), torch.cat(aesthetic) if aesthetic else None

    def score_frames(
        self,
        batches: Iterator[np.ndarray] | Sequence[np.ndarray],
        prompts: Sequence[str],
        latent_starts: Sequence[int],
        num_latent_frames: int,
        temporal_compression: int,
        boundary_frames: int = 16,
    ) -> VideoScores:
        """Scores of one video given as frame batches (``[B, H, W, 3]``, uint8 or [0, 1]) whose
        decoder made ``temporal_compression`` frames per latent frame after the first."""
        dino, clip, aesthetic = self.frame_features(batches)
        ranges = segment_ranges(len(dino), latent_starts, num_latent_frames, temporal_compression)
        empty = [k for k, r in enumerate(ranges) if len(r) == 0]
        if empty:
            raise ValueError(
                f"{len(dino)} frames are too few for {len(ranges)} segments "
                f"(segments {empty} would be empty)"
            )
        return score_video_features(
            dino, clip, self.text_features(prompts), ranges, boundary_frames, aesthetic
        )


def score_entry(
    entry: VideoEntry, scorer: VideoScorer, protocol: EvalProtocol
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The per-video row and the per-segment rows of one entry (status set on failure)."""
    row: dict[str, Any] = {
        "config": entry.config,
        "group": entry.group.id if entry.group else "",
        "video": entry.video,
        "status": entry.status,
        "message": entry.message,
        "num_frames": None,
        "num_segments": len(entry.group.prompts) if entry.group else None,
        **{name: None for name in VIDEO_SCORES},
        "path": str(entry.path) if entry.path else "",
    }
    if entry.status != "pending":
        return row, []
    assert entry.group is not None and entry.path is not None
    scorer.load()  # a model that cannot load stops the run; it is not a per-video failure
    local = replace(
        protocol,
        frames_per_prompt=entry.frames_per_prompt or protocol.frames_per_prompt,
        num_latent_frames=entry.num_latent_frames or protocol.num_latent_frames,
    )
    prompts = entry.group.prompts
    try:
        starts = local.latent_starts(len(prompts), entry.frames_per_chunk)
        scores = scorer.score_frames(
            iter_video_batches(entry.path, scorer.batch_size),
            prompts,
            starts,
            local.latent_frames(len(prompts)),
            local.temporal_compression,
            local.boundary_frames,
        )
    except VideoReadError as error:
        row.update(status=MISSING if not entry.path.is_file() else UNREADABLE, message=str(error))
        return row, []
    except Exception as error:  # e.g. too few frames for the segments, out of memory
        row.update(status=ERROR, message=f"{type(error).__name__}: {error}")
        return row, []
    row.update(status=OK, num_frames=scores.segments[-1].frames.stop)
    row.update({name: getattr(scores, name) for name in VIDEO_SCORES})
    segments = []
    for segment in scores.segments:
        segments.append(
            {
                "config": entry.config,
                "group": entry.group.id,
                "video": entry.video,
                "segment": segment.segment + 1,
                "prompt": prompts[segment.segment],
                "start_frame": segment.frames.start,
                "end_frame": segment.frames.stop,
                "num_frames": len(segment.frames),
                **{name: getattr(segment, name) for name in SEGMENT_SCORES},
            }
        )
    return row, segments


def evaluate(
    entries: Sequence[VideoEntry],
    scorer: VideoScorer,
    protocol: EvalProtocol,
    output_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: TextIO | None = None,
) -> EvalResult:
    """Score ``entries``, report failures on ``log`` (stderr), and write the reports into
    ``output_dir`` (``videos.csv``, ``segments.csv``, ``summary.csv``, ``summary.md``,
    ``segment_scores.png``) when given."""
    log = log or sys.stderr
    video_rows, segment_rows = [], []
    for entry in tqdm(entries, desc="memflow eval: scoring", disable=not progress):
        row, segments = score_entry(entry, scorer, protocol)
        if row["status"] != OK:
            print(
                f"memflow eval: {row['config']}/{row['video']}: {row['status']}: {row['message']}",
                file=log,
            )
        video_rows.append(row)
        segment_rows.extend(segments)
    summary = summarize(video_rows, segment_rows)
    result = EvalResult(video_rows, segment_rows, summary, scorer.has_aesthetic)
    if output_dir is not None:
        result.files = write_reports(result, output_dir)
    failed = len(result.failed)
    if failed:
        print(f"memflow eval: {failed} of {len(video_rows)} video(s) not scored (see the status "
              f"column of videos.csv)", file=log)
    return result
