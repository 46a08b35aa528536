"""What a world model copies from its context: teacher-forced probes at pure noise
(``bench/world_copy_probe.py``).

The clean latents of a story are committed chunk by chunk into a MemFlow session (teacher forcing:
the memory holds exactly what the story shows), and at a few chunks the model predicts the clean
chunk from pure noise (sigma 1, one flow pass, no guidance). Where the prompt does not describe
what is on screen, only the context can tell it (``PROBES``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memflow_adapter.streaming import ChunkEngine, PromptConditioning, plan_chunks

from .dataset import script_sample
from .detect import detect
from .pipeline import WORLD_MEMORY, NarrativeWorldPipeline
from .scoring import streaming_world

#: The latent tokens of the frame's centre (the entity's 16 x 16 pixels at most): rows and columns.
CENTRE = slice(4, 12)


@dataclass(frozen=True)
class Probe:
    """One probed chunk (its index in the story's chunk plan) and whether its prompt is kept."""

    name: str
    chunk: int
    prompt: bool


#: The probed chunks of a story (two-frame chunks, four-frame segments): the return's first chunk
#: (its look only in the bank: the first appearance, 12-16 frames earlier), its second (the
#: entity exactly as it must be drawn in the two frames just before), the entrance's second with
#: its prompt dropped (place and entity in the two frames just before), and the walker's second,
#: its prompt describing it (drawing from the word).
PROBES = (
    Probe("return, bank", 10, True),
    Probe("return, window", 11, True),
    Probe("entrance, no prompt", 3, False),
    Probe("walker, prompt", 7, True),
)


@dataclass(frozen=True)
class ProbeResult:
    """One probe on one story: the predicted frame's entity looks as the truth's, and the mean
    squared latent error inside and outside the frame's centre."""

    probe: str
    right: bool
    centre_error: float
    place_error: float


def probe_story(
    pipe: NarrativeWorldPipeline, layout: str, seed: int, probes: Sequence[Probe] = PROBES
) -> list[ProbeResult]:
    """Teacher-force story ``seed`` through the model under memory ``layout`` and run ``probes``
    (the noise of each probe drawn from ``seed``)."""
    edition = pipe.sampling.edition
    sample = script_sample(pipe, seed, edition)
    video = sample.latents[None].float()
    streaming = streaming_world(pipe, layout)
    attachment = streaming.attachment
    conditions = [PromptConditioning.of(attachment, e[None]) for e in sample.prompt_embeds]
    chunks = plan_chunks(
        sample.segment_starts.tolist(), video.shape[2], WORLD_MEMORY.frames_per_chunk
    )
    by_chunk = {probe.chunk: probe for probe in probes}
    session = attachment.create_session(video.shape[3], video.shape[4], record_trace=False)
    noise = torch.Generator().manual_seed(seed)
    scale = pipe.vae.config.latents_std[0]
    results = []
    with attachment.bind(session), torch.no_grad():
        engine = ChunkEngine(
            pipe.transformer, session, streaming.schedule,
            conditioning=attachment.integration.conditioning_inputs(1, 16),
        )
        for opened in engine.chunks(chunks[: max(by_chunk) + 1], conditions, video):
            probe = by_chunk.get(opened.chunk.index)
            if probe is None:
                continue
            clean = video[:, :, opened.chunk.start : opened.chunk.stop]
            pure = torch.randn(clean.shape, generator=noise)
            embeds = opened.cond.embeds if probe.prompt else torch.zeros_like(opened.cond.embeds)
            predicted = pure - engine.flow(pure, 1000.0, embeds)  # sigma 1: x = noise
            error = ((predicted - clean) ** 2).mean(dim=(0, 1, 2))  # [h, w]
            centre = error[CENTRE, CENTRE]
            place = (error.sum() - centre.sum()) / (error.numel() - centre.numel())
            frames = pipe.vae.decode(torch.cat([predicted, clean]) * scale).sample
            seen, truth = (detect(frames[i, :, 0], edition) for i in (0, 1))
            results.append(ProbeResult(probe.name, seen.looks == truth.looks,
                                       float(centre.mean()), float(place)))
    return results
