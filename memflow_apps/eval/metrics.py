"""The benchmark's metrics as pure functions of per-frame feature tensors, and segment splitting.

Notation: a video has frames ``0..T-1``; ``f_t`` is frame ``t``'s feature vector (DINO for
*subject*, CLIP image for *background*, as in VBench); ``cos`` is the cosine similarity and
``cos+ = max(0, cos)`` (VBench clamps every frame-to-frame cosine at 0). A video of ``n`` prompts
has ``n`` segments ``S_0..S_{n-1}`` (see :func:`segment_ranges`).

* **CLIP score** of segment ``S_k`` with prompt ``p_k`` (:func:`clip_score`):
  ``100 * mean_{t in S_k} cos(clip_image(f_t), clip_text(p_k))`` (not clamped).
* **Temporal consistency** of a run of frames ``t = 0..m-1`` (:func:`temporal_consistency`,
  VBench's subject / background consistency):
  ``mean_{t=1..m-1} (cos+(f_t, f_0) + cos+(f_t, f_{t-1})) / 2``; undefined (NaN) for ``m < 2``.
  *Subject consistency* uses DINO features, *background consistency* CLIP image features; the
  *consistency score* is their mean. A segment's value is computed over its own frames.
* **Cross-segment consistency**, for each segment ``S_k`` with ``k >= 1`` and each feature type:
  the *boundary* similarity (:func:`boundary_similarity`) ``mean cos+(f_a, f_b)`` over the pairs
  ``a`` in the last ``w`` frames of ``S_{k-1}`` and ``b`` in the first ``w`` frames of ``S_k``
  (``w`` = ``boundary_frames``, capped by the segments' lengths); and the *anchor* similarity
  (:func:`anchor_similarity`) ``cos+(f_{first(S_k)}, f_0)``, the segment's first frame against
  the video's first frame. A segment's cross-segment consistency is the mean of its four values
  (boundary and anchor, subject and background); a video's is the mean over ``k = 1..n-1``.
* **Aesthetic quality**, only with a predictor: the mean over the segment's frames of the
  predictor's per-frame score on a 0-1 scale (the LAION predictor's 0-10 score / 10, as VBench).

Reports multiply every score but the CLIP score (already x100) by 100; video-level scores are
means over the video's segments (VBench-Long style, segments as clips), and a configuration's
scores are means over its videos. NaN means *undefined* and is left out of means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from memflow_adapter.streaming import applied_segment_starts

__all__ = [
    "SegmentScores",
    "VideoScores",
    "anchor_similarity",
    "boundary_similarity",
    "chunk_aligned_starts",
    "clip_score",
    "cosine_matrix",
    "nanmean",
    "normalize",
    "pixel_frame_of_latent",
    "score_video_features",
    "segment_ranges",
    "temporal_consistency",
]


# ------------------------------------------------------------------------------- elementary
def normalize(features: torch.Tensor) -> torch.Tensor:
    """L2-normalise along the last dimension, in float64 (zero vectors stay zero)."""
    features = torch.as_tensor(features).double()
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[Na, Nb]`` cosines between the rows of ``a`` ``[Na, D]`` and ``b`` ``[Nb, D]``."""
    return normalize(_as_rows(a)) @ normalize(_as_rows(b)).T


def nanmean(values: Sequence[float | None]) -> float:
    """Mean of the values that are neither ``None`` nor NaN; NaN when there are none."""
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _as_rows(features: torch.Tensor) -> torch.Tensor:
    features = torch.as_tensor(features)
    if features.ndim == 1:
        features = features[None]
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D] (or [D]), got shape {tuple(features.shape)}")
    return features


# ----------------------------------------------------------------------------------- metrics
def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """``100 *`` the mean over frames of ``cos(image_t, text)``; NaN without frames.

    Args:
        image_features: ``[T, D]`` CLIP image embeddings of the segment's frames.
        text_features: ``[D]`` (or ``[1, D]``) CLIP text embedding of the segment's prompt.
    """
    images, text = _as_rows(image_features), _as_rows(text_features)
    if text.shape[0] != 1:
        raise ValueError(f"text_features must hold one embedding, got {text.shape[0]}")
    if images.shape[0] == 0:
        return math.nan
    return float(100.0 * cosine_matrix(images, text).mean())


def temporal_consistency(features: torch.Tensor, clamp: bool = True) -> float:
    """VBench's subject/background consistency of ``[T, D]`` per-frame features.

    ``mean_{t=1..T-1} (cos+(f_t, f_0) + cos+(f_t, f_{t-1})) / 2`` with ``cos+ = max(0, cos)``
    (``clamp=False``: plain ``cos``). 1.0 for a static video; NaN for fewer than 2 frames.
    """
    rows = normalize(_as_rows(features))
    if rows.shape[0] < 2:
        return math.nan
    to_first = rows[1:] @ rows[0]
    to_previous = (rows[1:] * rows[:-1]).sum(dim=-1)
    if clamp:
        to_first, to_previous = to_first.clamp_min(0), to_previous.clamp_min(0)
    return float(((to_first + to_previous) / 2).mean())


def boundary_similarity(
    before: torch.Tensor, after: torch.Tensor, window: int, clamp: bool = True
) -> float:
    """Similarity across a prompt switch: the mean ``cos+`` over all pairs of the last
    ``window`` rows of ``before`` and the first ``window`` rows of ``after`` (each capped at its
    length); NaN when either is empty."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    before, after = _as_rows(before), _as_rows(after)
    if before.shape[0] == 0 or after.shape[0] == 0:
        return math.nan
    cosines = cosine_matrix(before[-window:], after[:window])
    return float((cosines.clamp_min(0) if clamp else cosines).mean())


def anchor_similarity(anchor: torch.Tensor, frame: torch.Tensor, clamp: bool = True) -> float:
    """``cos+(frame, anchor)`` of two ``[D]`` feature vectors (the video's first frame and a
    segment's first frame)."""
    cosine = float(cosine_matrix(anchor, frame)[0, 0])
    return max(0.0, cosine) if clamp else cosine


# ------------------------------------------------------------------------- segment splitting
def chunk_aligned_starts(
    num_prompts: int, frames_per_prompt: int, num_latent_frames: int, frames_per_chunk: int = 1
) -> list[int]:
    """First latent frame of each prompt's segment as a streaming generator applies it.

    Prompt ``k`` is scheduled at latent frame ``k * frames_per_prompt``; a generator working in
    chunks of ``frames_per_chunk`` frames switches at the first chunk boundary at or after it,
    ``ceil(k * frames_per_prompt / frames_per_chunk) * frames_per_chunk`` (the reference: 40 -> 42
    with 3-frame chunks): the core's chunk plan (``streaming.applied_segment_starts``), the one
    the pipeline generates with.

    Raises:
        ValueError: a prompt would start at or after ``num_latent_frames`` (never shown).
    """
    for name, value in (
        ("num_prompts", num_prompts),
        ("frames_per_prompt", frames_per_prompt),
        ("num_latent_frames", num_latent_frames),
        ("frames_per_chunk", frames_per_chunk),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    scheduled = [k * frames_per_prompt for k in range(num_prompts)]
    try:
        return applied_segment_starts(scheduled, num_latent_frames, frames_per_chunk)
    except ValueError as error:
        raise ValueError(f"a prompt would start past the video: {error}") from error


def pixel_frame_of_latent(latent_frame: int, temporal_compression: int) -> int:
    """First decoded frame of a latent frame under a causal video VAE: latent 0 decodes to
    frame 0 alone, latent ``j >= 1`` to frames ``c*j - (c-1) .. c*j`` (``c`` the compression)."""
    if latent_frame <= 0:
        return 0
    return temporal_compression * latent_frame - (temporal_compression - 1)


def segment_ranges(
    num_frames: int,
    latent_starts: Sequence[int],
    num_latent_frames: int,
    temporal_compression: int,
) -> list[range]:
    """Decoded-frame ranges of the segments that start at ``latent_starts`` (latent frames).

    When ``num_frames == c * (num_latent_frames - 1) + 1`` (a causal VAE's output, e.g. 957 frames
    for 240 latent frames) the split is exact (:func:`pixel_frame_of_latent`); otherwise (videos
    from another decoder, re-encoded or trimmed) latent frame ``j`` maps to decoded frame
    ``round(j * num_frames / num_latent_frames)``, i.e. segments split the video proportionally
    in time. The last segment ends at the last frame.
    """
    if num_frames < 0 or num_latent_frames < 1 or not latent_starts or latent_starts[0] != 0:
        raise ValueError(
            f"need num_frames >= 0, num_latent_frames >= 1 and latent_starts beginning at 0, "
            f"got {num_frames}, {num_latent_frames}, {list(latent_starts)}"
        )
    if any(b <= a for a, b in zip(latent_starts, latent_starts[1:], strict=False)):
        raise ValueError(f"latent_starts must increase, got {list(latent_starts)}")
    exact = num_frames == temporal_compression * (num_latent_frames - 1) + 1

    def first_frame(latent: int) -> int:
        if latent >= num_latent_frames:
            return num_frames
        if exact:
            return pixel_frame_of_latent(latent, temporal_compression)
        return min(num_frames, round(latent * num_frames / num_latent_frames))

    bounds = [first_frame(start) for start in latent_starts] + [num_frames]
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


# -------------------------------------------------------------------------------- aggregation
@dataclass(frozen=True)
class SegmentScores:
    """One segment's scores, all on the reported scale (x100); NaN when undefined, ``None``
    when not measured (aesthetic quality without a predictor)."""

    segment: int
    frames: range
    clip_score: float
    subject_consistency: float
    background_consistency: float
    boundary_subject: float = math.nan
    boundary_background: float = math.nan
    anchor_subject: float = math.nan
    anchor_background: float = math.nan
    aesthetic_quality: float | None = None

    @property
    def consistency(self) -> float:
        """Mean of subject and background consistency."""
        return nanmean([self.subject_consistency, self.background_consistency])

    @property
    def cross_segment_consistency(self) -> float:
        """Mean of the boundary and anchor similarities (NaN for the first segment)."""
        return nanmean(
            [
                self.boundary_subject,
                self.boundary_background,
                self.anchor_subject,
                self.anchor_background,
            ]
        )


@dataclass(frozen=True)
class VideoScores:
    """A video's per-segment scores and their means (the video-level scores, x100)."""

    segments: list[SegmentScores] = field(default_factory=list)

    def _mean(self, name: str) -> float:
        return nanmean([getattr(segment, name) for segment in self.segments])

    @property
    def clip_score(self) -> float:
        return self._mean("clip_score")

    @property
    def subject_consistency(self) -> float:
        return self._mean("subject_consistency")

    @property
    def background_consistency(self) -> float:
        return self._mean("background_consistency")

    @property
    def consistency(self) -> float:
        return self._mean("consistency")

    @property
    def cross_segment_consistency(self) -> float:
        return nanmean([s.cross_segment_consistency for s in self.segments[1:]])

    @property
    def aesthetic_quality(self) -> float | None:
        values = [s.aesthetic_quality for s in self.segments]
        return None if any(v is None for v in values) else nanmean(values)


def score_video_features(
    subject_features: torch.Tensor,
    background_features: torch.Tensor,
    text_features: torch.Tensor,
    ranges: Sequence[range],
    boundary_frames: int = 16,
    aesthetic: torch.Tensor | None = None,
) -> VideoScores:
    """All of a video's scores from its per-frame features.

    Args:
        subject_features: ``[T, Ds]`` DINO features of every frame.
        background_features: ``[T, Dc]`` CLIP image embeddings of every frame (also used for the
            CLIP score).
        text_features: ``[n, Dc]`` CLIP text embeddings of the ``n`` segment prompts.
        ranges: the ``n`` segments' frame ranges (:func:`segment_ranges`).
        boundary_frames: ``w`` of the boundary similarity.
        aesthetic: ``[T]`` per-frame aesthetic scores on a 0-1 scale, or ``None`` (absent).
    """
    subject, background = _as_rows(subject_features), _as_rows(background_features)
    texts = _as_rows(text_features)
    frames = subject.shape[0]
    if background.shape[0] != frames or (aesthetic is not None and len(aesthetic) != frames):
        raise ValueError("every per-frame tensor must hold the same number of frames")
    if texts.shape[0] != len(ranges):
        raise ValueError(f"{texts.shape[0]} prompt embeddings for {len(ranges)} segments")
    if ranges and (ranges[0].start != 0 or ranges[-1].stop != frames):
        raise ValueError(f"segment ranges {ranges} do not cover the {frames} frames")
    segments = []
    for k, frame_range in enumerate(ranges):
        rows = slice(frame_range.start, frame_range.stop)
        extra = {}
        if k > 0:
            previous = slice(ranges[k - 1].start, ranges[k - 1].stop)
            first = frame_range.start
            has_first = first < frames and len(frame_range) > 0
            extra = {
                "boundary_subject": 100 * boundary_similarity(
                    subject[previous], subject[rows], boundary_frames
                ),
                "boundary_background": 100 * boundary_similarity(
                    background[previous], background[rows], boundary_frames
                ),
                "anchor_subject": 100 * anchor_similarity(subject[0], subject[first])
                if has_first
                else math.nan,
                "anchor_background": 100 * anchor_similarity(background[0], background[first])
                if has_first
                else math.nan,
            }
        aesthetic_score = None
        if aesthetic is not None:
            values = torch.as_tensor(aesthetic).double()[rows]
            aesthetic_score = 100 * float(values.mean()) if len(values) else math.nan
        segments.append(
            SegmentScores(
                segment=k,
                frames=frame_range,
                clip_score=clip_score(background[rows], texts[k]),
                subject_consistency=100 * temporal_consistency(subject[rows]),
                background_consistency=100 * temporal_consistency(background[rows]),
                aesthetic_quality=aesthetic_score,
                **extra,
            )
        )
    return VideoScores(segments)
