"""The student's passes in a MemFlow session, on the core's chunk loop
(``memflow_adapter.streaming.ChunkEngine.chunks``): teacher-forced commits, Self-Forcing
rollouts, and the replay that gives a rollout its gradient.

The session caches detached keys and values, so a chunk's output depends on the trained weights
only through that chunk's own passes. A rollout is therefore run entirely without gradient, and
the chunks that carry gradient are replayed afterwards from a saved session state, one exit-step
pass each, with the backward of each chunk's loss right after its pass. The gradient is the one a
single graph over the whole rollout would give, while only one pass's activations are alive at a
time.

Backward runs inside a (read-only) denoise pass of the same session: with gradient checkpointing,
the transformer blocks recompute their self-attention during backward and must attend to exactly
the cache the forward saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from memflow_adapter.streaming import ChunkEngine, ChunkPlan, OpenChunk, PromptConditioning

from .flow import StepRandomness


def randomness_noise(randomness: StepRandomness, device: torch.device):
    """The step's per-sample generators as the engine's ``step_noise``."""
    return lambda chunk_index, step, shape: randomness.randn(tuple(shape), device)


def commit_clean_chunks(
    engine: ChunkEngine,
    chunks: Sequence[ChunkPlan],
    conditions: Sequence[PromptConditioning],
    video: torch.Tensor,
) -> None:
    """Teacher forcing: write the clean frames of ``chunks`` of ``video`` ``[B, C, F, h, w]``
    into the cache, each in its own chunk lifecycle (NAM commits, recaches at prompt switches,
    context passes)."""
    for _ in engine.chunks(chunks, conditions, video):
        pass  # the loop opens and commits each chunk


@dataclass
class Rollout:
    """A Self-Forcing rollout.

    Attributes:
        video: ``[B, C, F, h, w]`` float32 clean latents of every chunk.
        exit_inputs: per gradient chunk (by index), the float64 noisy input ``[B, C, f, h, w]``
            of its exit step.
        replay_state: the session state before the first gradient chunk (``None`` without one).
    """

    video: torch.Tensor
    exit_inputs: dict[int, torch.Tensor]
    replay_state: dict[str, torch.Tensor] | None


@torch.no_grad()
def self_forcing_rollout(
    engine: ChunkEngine,
    chunks: Sequence[ChunkPlan],
    exit_steps: Sequence[int],
    conditions: Sequence[PromptConditioning],
    noise: torch.Tensor,
    randomness: StepRandomness,
    gradient_from: int,
) -> Rollout:
    """Generate every chunk with the few-step schedule, chunk ``i`` stopping at its exit step
    ``exit_steps[i]``, and keep what ``replay_with_gradient`` needs for chunks ``gradient_from ..``.

    Args:
        noise: ``[B, C, F, h, w]`` initial noise of the whole video.
        randomness: draws the re-noising noise between steps.
        gradient_from: index of the first gradient chunk (``len(chunks)`` for none).
    """
    video = torch.zeros_like(noise, dtype=torch.float32)
    step_noise = randomness_noise(randomness, noise.device)

    def generate(part: list[ChunkPlan]) -> Iterator[OpenChunk]:
        return engine.chunks(
            part, conditions, video, noise=noise, step_noise=step_noise, exit_steps=exit_steps
        )

    for _ in generate([chunk for chunk in chunks if chunk.index < gradient_from]):
        pass  # the loop denoises and commits each chunk
    clip = [chunk for chunk in chunks if chunk.index >= gradient_from]
    replay_state = engine.session.state_dict() if clip else None
    exit_inputs = {opened.chunk.index: opened.denoised.exit_input for opened in generate(clip)}
    return Rollout(video, exit_inputs, replay_state)


def replay_with_gradient(
    engine: ChunkEngine,
    accelerator: Accelerator,
    rollout: Rollout,
    chunks: Sequence[ChunkPlan],
    exit_steps: Sequence[int],
    conditions: Sequence[PromptConditioning],
    chunk_loss: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Re-run each gradient chunk's exit step with gradient and backpropagate its loss.

    Args:
        chunk_loss: ``(chunk index, clean [B, C, f, h, w] float64 with gradient) -> scalar``;
            the losses of all chunks add up to the step's loss.

    Returns:
        The detached sum of the chunk losses.
    """
    if rollout.replay_state is None:
        raise ValueError("the rollout has no gradient chunk to replay")
    engine.session.load_state_dict(rollout.replay_state)
    schedule = engine.schedule

    def exit_step_loss(chunk: ChunkPlan, cond: PromptConditioning) -> torch.Tensor:
        timestep = float(schedule.timesteps[exit_steps[chunk.index]])
        noisy = rollout.exit_inputs[chunk.index]
        flow = engine.flow(noisy, timestep, cond.embeds, grad=True)
        clean = schedule.predict_clean(noisy, flow, schedule.sigma_at(timestep))
        return chunk_loss(chunk.index, clean)

    replayed = [chunks[index] for index in sorted(rollout.exit_inputs)]
    return backward_chunk_by_chunk(
        engine, accelerator, replayed, conditions, rollout.video, exit_step_loss
    )


def backward_chunk_by_chunk(
    engine: ChunkEngine,
    accelerator: Accelerator,
    chunks: Sequence[ChunkPlan],
    conditions: Sequence[PromptConditioning],
    video: torch.Tensor,
    loss_of: Callable[[ChunkPlan, PromptConditioning], torch.Tensor],
) -> torch.Tensor:
    """Open each of ``chunks`` (in order) in turn, backpropagate ``loss_of(chunk, conditioning)``
    (a loss of the open chunk's gradient pass), then commit the chunk's clean frames of ``video``
    ``[B, C, F, h, w]`` before the next (the last stays open).

    Returns:
        The detached sum of the losses.
    """
    losses = []
    for opened in engine.chunks(chunks, conditions, video, commit_last=False):
        # Gradients are all-reduced once, after the last chunk's backward.
        with nullcontext() if opened.last else accelerator.no_sync(engine.trained):
            loss = loss_of(opened.chunk, opened.cond)
            engine.backward(loss, accelerator.backward)
        losses.append(loss.detach())
    return sum(losses[1:], start=losses[0])
