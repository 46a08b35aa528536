"""Generation and scoring of narrative-world scripts under memory layouts.

Scores of one generated script (frames read by the exact detectors of ``detect.py``):

* ``adherence``: the fraction of the script's checks the video passes: each frame shows the
  segment's place; P, in every frame of segment 2, and Q, in every frame of segment 4, look as
  their prompts describe them (size, colour, shape); the frames of the empty opening and of each
  "leaves" segment show no entity.
* ``return_looks``: P, back at the end of segment 6, looks as it did at its first appearance
  (end of segment 2) in the same video (``return_colour`` / ``_size`` / ``_shape`` per attribute;
  false when no entity was fully in view at the first appearance), the consistency memory is
  for: segment 6's prompt names P but does not describe it.
* ``return_truth``: P is back looking as the script describes it.
* ``return_place``: segment 6 shows the place of the opening (also from the video itself).
* ``first_looks``: P's first appearance (the frame ``return_looks`` compares with) looks as
  segment 2's prompt describes it (``first_colour`` / ``_size`` / ``_shape`` per attribute): what
  the model can draw at all, from the prompt, without memory (a model that cannot draw a shape on
  purpose can hardly redraw it from memory).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memflow_adapter.config import MemFlowConfig
from memflow_adapter.hooks import get_memflow, remove_memflow
from memflow_adapter.introspection import ChunkMemory
from memflow_adapter.pipeline import MemFlowStreamingPipeline
from memflow_adapter.streaming import PromptSchedule, applied_segment_starts

from .detect import Detection, detect
from .grammar import SEGMENT_FRAMES, Entity, Script
from .pipeline import (
    WORLD_MEMORY,
    WORLD_SEQUENCE_LENGTH,
    NarrativeWorldPipeline,
)
from .render import HEIGHT, WIDTH

#: The layouts compared: MemFlow (NAM bank), MemFlow with SMA, LongLive (sink + window), and the
#: local window alone.
WORLD_LAYOUTS: dict[str, MemFlowConfig] = {
    "reference": WORLD_MEMORY,
    "reference_sma": dataclasses.replace(WORLD_MEMORY, sma=True, sma_top_k=3),
    "longlive": dataclasses.replace(WORLD_MEMORY, bank_frames=0, nam=False),
    "window_only": dataclasses.replace(WORLD_MEMORY, sink_frames=0, bank_frames=0, nam=False),
}


@dataclass(frozen=True)
class ScriptScores:
    adherence: float
    return_looks: bool
    return_colour: bool
    return_size: bool
    return_shape: bool
    return_truth: bool
    return_place: bool
    first_looks: bool
    first_colour: bool
    first_size: bool
    first_shape: bool
    seconds_per_chunk: float


@dataclass(frozen=True)
class Generated:
    """A generated script: ``video`` ``[F, 3, H, W]`` in ``[-1, 1]``, per-chunk seconds, and the
    pipeline's output (latents, memory trace, chunk reports)."""

    video: torch.Tensor
    chunk_seconds: list[float]
    output: object


def generate_script(
    streaming: MemFlowStreamingPipeline,
    script: Script,
    seed: int,
    guidance_scale: float | None = None,
    switch_offset: int = 0,
) -> Generated:
    """Stream ``script``'s six prompts (``SEGMENT_FRAMES`` latent frames each, each switch
    ``switch_offset`` frames late: ``script_schedule``), with classifier-free guidance above
    scale 1 (negative: the zero embedding; default: the model's ``WorldSampling``). The script
    must be of the world edition the model was trained on."""
    model_edition = streaming.pipe.sampling.edition
    if script.edition != model_edition:
        raise ValueError(
            f"script.edition must be the model's world edition {model_edition!r} (its "
            f"sampling.json), got {script.edition!r}: make the script with "
            f"make_script(seed, {model_edition!r})"
        )
    if guidance_scale is None:
        guidance_scale = streaming.pipe.sampling.guidance_scale
    output = streaming(
        script_schedule(script, switch_offset),
        num_latent_frames=script.num_frames,
        height=HEIGHT,
        width=WIDTH,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        max_sequence_length=WORLD_SEQUENCE_LENGTH,
        guidance_scale=guidance_scale,
        progress=False,
    )
    video = output.frames[0] * 2.0 - 1.0  # "pt" frames are [F, 3, H, W] in [0, 1]
    return Generated(video, [chunk.seconds for chunk in output.chunks], output)


def script_schedule(script: Script, switch_offset: int = 0) -> PromptSchedule:
    """The script's prompts at their segments' first latent frames; ``switch_offset`` moves every
    switch that many frames later (off the chunk boundaries for an odd offset: the stream then
    applies it at the next boundary)."""
    if not 0 <= switch_offset < SEGMENT_FRAMES:
        raise ValueError(f"switch_offset must be in 0..{SEGMENT_FRAMES - 1}, got {switch_offset}")
    starts = [0] + [start + switch_offset for start in script.segment_starts[1:]]
    return PromptSchedule(tuple(zip(script.prompts, starts, strict=True)))


def streaming_world(
    pipe: NarrativeWorldPipeline, layout: str, **config_overrides: Any
) -> MemFlowStreamingPipeline:
    """``pipe`` streamed with ``WORLD_LAYOUTS[layout]`` (with ``config_overrides``, e.g.
    ``cache_dtype="int8"``) and the model's schedule (``pipe.sampling``; any previous
    attachment removed)."""
    if layout not in WORLD_LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(WORLD_LAYOUTS)}, got {layout!r}")
    return streaming_with(pipe, dataclasses.replace(WORLD_LAYOUTS[layout], **config_overrides))


def streaming_with(pipe: NarrativeWorldPipeline, config: MemFlowConfig) -> MemFlowStreamingPipeline:
    """``pipe`` streamed with ``config`` and the model's schedule (``pipe.sampling``; any
    previous attachment removed)."""
    if get_memflow(pipe.transformer) is not None:
        remove_memflow(pipe.transformer)
    return MemFlowStreamingPipeline(pipe, config, pipe.sampling.schedule, device="cpu")


def segment_frames(script: Script, schedule: PromptSchedule) -> list[range]:
    """The latent frames of each of the script's segments as the stream generates them with
    ``schedule`` (the core's chunk plan: a segment starts at the first chunk boundary at or after
    its frame)."""
    starts = applied_segment_starts(
        schedule.segment_starts, script.num_frames, WORLD_MEMORY.frames_per_chunk
    )
    return [range(a, b) for a, b in zip(starts, [*starts[1:], script.num_frames], strict=True)]


def _looks(entity: Entity) -> tuple[str, str, str]:
    return entity.colour, entity.size, entity.shape


def score_script(
    script: Script,
    video: torch.Tensor,
    chunk_seconds: Sequence[float],
    schedule: PromptSchedule | None = None,
) -> ScriptScores:
    """Score a video ``[F, 3, H, W]`` in ``[-1, 1]`` of ``script`` generated with ``schedule``
    (default ``script_schedule(script)``; see the module docstring)."""
    detections = [detect(frame, script.edition) for frame in video]
    frames_of = segment_frames(script, schedule or script_schedule(script))
    checks: list[bool] = []
    for index, segment in enumerate(script.segments[:-1]):
        frames = [detections[frame] for frame in frames_of[index]]
        checks += [found.place == segment.place.name for found in frames]
        if segment.entity is None or segment.action == "leaves":
            checks += [found.colour is None for found in frames]
        else:
            checks += [found.looks == _looks(segment.entity) for found in frames]
    first: Detection = detections[frames_of[script.first_appearance][-1]]
    back: Detection = detections[frames_of[script.return_segment][-1]]
    # an entity fully in view (a noise frame reads as one colour touching every edge)
    seen_first = first.shape is not None
    return ScriptScores(
        adherence=sum(checks) / len(checks),
        return_looks=seen_first and back.looks == first.looks,
        return_colour=seen_first and back.colour == first.colour,
        return_size=seen_first and back.size == first.size,
        return_shape=seen_first and back.shape == first.shape,
        return_truth=back.looks == _looks(script.returning),
        return_place=back.place == detections[0].place,
        first_looks=first.looks == _looks(script.returning),
        first_colour=first.colour == script.returning.colour,
        first_size=first.size == script.returning.size,
        first_shape=first.shape == script.returning.shape,
        seconds_per_chunk=statistics.mean(chunk_seconds),
    )


def return_retrieval(
    script: Script, trace: Sequence[ChunkMemory], schedule: PromptSchedule | None = None
) -> float:
    """The retrieval score of one generated story, which needs no good generator: at the chunk
    where the entity returns, the share of layers whose bank holds a frame of its first
    appearance (``ChunkMemory.bank_recall``; 0 without a bank)."""
    frames_of = segment_frames(script, schedule or script_schedule(script))
    back = frames_of[script.return_segment].start
    chunk = next(chunk for chunk in trace if chunk.start_frame == back)
    return chunk.bank_recall(frames_of[script.first_appearance])


def mean_scores(scores: Sequence[ScriptScores]) -> dict[str, float]:
    """Each field averaged over scripts (booleans as rates)."""
    return {
        field.name: statistics.mean(float(getattr(s, field.name)) for s in scores)
        for field in dataclasses.fields(ScriptScores)
    }


@dataclass(frozen=True)
class PairedComparison:
    """One per-story check under a layout against a baseline layout on the same stories: the
    stories where it holds only under the layout, and only under the baseline."""

    only_layout: int
    only_baseline: int

    @property
    def p_value(self) -> float:
        """Exact two-sided sign test of ``only_layout`` against ``only_baseline`` (1 when they
        are equal or both 0)."""
        discordant = self.only_layout + self.only_baseline
        fewer = min(self.only_layout, self.only_baseline)
        tail = sum(math.comb(discordant, k) for k in range(fewer + 1)) / 2**discordant
        return min(1.0, 2.0 * tail)


def compare_paired(
    scores: Sequence[ScriptScores], baseline: Sequence[ScriptScores], check: str
) -> PairedComparison:
    """``check`` (a boolean field of ``ScriptScores``) story by story: ``scores[i]`` and
    ``baseline[i]`` must be the same story."""
    if len(scores) != len(baseline):
        raise ValueError(f"scores and baseline must cover the same stories, got {len(scores)} "
                         f"and {len(baseline)}")
    pairs = [(getattr(a, check), getattr(b, check)) for a, b in zip(scores, baseline, strict=True)]
    return PairedComparison(
        only_layout=sum(a and not b for a, b in pairs),
        only_baseline=sum(b and not a for a, b in pairs),
    )
