"""The student's passes in a MemFlow session: teacher-forced commits, Self-Forcing rollouts, and
the replay that gives a rollout its gradient.

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

import bisect
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from memflow_adapter import MemFlowAttachment, StreamingSession
from memflow_adapter.schedule import FlowMatchSchedule

from .flow import StepRandomness, predict_flow


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk: latent frames ``start .. stop - 1``, the prompt segment it is generated with,
    whether it starts with a KV recache (its segment differs from the previous chunk's), and the
    denoising step it exits at (Self-Forcing's random exit; ignored by teacher forcing)."""

    start: int
    stop: int
    segment: int
    recache: bool
    exit_step: int = 0


def plan_chunks(
    num_chunks: int,
    frames_per_chunk: int,
    segment_starts: Sequence[int],
    exit_steps: Sequence[int] | None = None,
) -> list[ChunkPlan]:
    """Chunks of a video whose prompt segments start at latent frames ``segment_starts``
    (ascending, the first 0); a chunk takes the last segment starting at or before its first
    frame, so a switch takes effect at the first chunk boundary at or after it."""
    plans = []
    for index in range(num_chunks):
        start = index * frames_per_chunk
        segment = bisect.bisect_right(segment_starts, start) - 1
        plans.append(
            ChunkPlan(
                start=start,
                stop=start + frames_per_chunk,
                segment=segment,
                recache=index > 0 and segment != plans[-1].segment,
                exit_step=0 if exit_steps is None else exit_steps[index],
            )
        )
    return plans


@dataclass(frozen=True)
class Conditioning:
    """One prompt segment: its embeddings ``[B, L, D]`` and NAM's per-layer text keys
    ``[B, L, H, D]`` (computed with the student's current weights)."""

    embeds: torch.Tensor
    text_keys: list[torch.Tensor]

    @classmethod
    def of(cls, attachment: MemFlowAttachment, embeds: torch.Tensor) -> Conditioning:
        with torch.no_grad():
            return cls(embeds, attachment.text_keys(embeds))


class StreamingStudent:
    """The student's passes in one bound session.

    Args:
        model: the transformer with MemFlow attached (passes without gradient go through it).
        trained: the same transformer as prepared by accelerate (DDP), for the gradient pass.
        session: the session bound to ``model``'s attachment.
        dtype: the transformer's parameter dtype.
    """

    def __init__(
        self, model: nn.Module, trained: nn.Module, session: StreamingSession, dtype: torch.dtype
    ) -> None:
        self.model = model
        self.trained = trained
        self.session = session
        self.dtype = dtype

    def open_chunk(self, chunk: ChunkPlan, cond: Conditioning, video: torch.Tensor) -> None:
        """NAM's commit for ``chunk``, then, after a prompt switch, the recache pass over the
        clean frames of ``video`` ``[B, C, F, h, w]`` that the session asks for."""
        self.session.begin_chunk(cond.text_keys)
        if chunk.recache:
            with torch.no_grad(), self.session.switch_prompt() as window:
                frames = video[:, :, window.start_frame : window.stop_frame]
                predict_flow(self.model, frames, 0.0, cond.embeds, self.dtype)

    def commit(self, clean: torch.Tensor, cond: Conditioning) -> None:
        """The context pass: writes the clean chunk ``[B, C, f, h, w]`` into the cache."""
        with torch.no_grad(), self.session.context_pass():
            predict_flow(self.model, clean, 0.0, cond.embeds, self.dtype)

    def flow(
        self, noisy: torch.Tensor, timestep: float | torch.Tensor, cond: Conditioning, grad: bool
    ) -> torch.Tensor:
        """A denoising pass over the open chunk; with ``grad``, through the prepared model."""
        model = self.trained if grad else self.model
        with torch.set_grad_enabled(grad), self.session.denoise_pass():
            return predict_flow(model, noisy, timestep, cond.embeds, self.dtype)

    def backward(self, accelerator: Accelerator, loss: torch.Tensor) -> None:
        """Backward of a loss of the open chunk's gradient pass (see the module docstring)."""
        with self.session.denoise_pass():
            accelerator.backward(loss)


def commit_clean_chunks(
    student: StreamingStudent,
    chunks: Sequence[ChunkPlan],
    conditions: Sequence[Conditioning],
    video: torch.Tensor,
) -> None:
    """Teacher forcing: write the clean frames of ``chunks`` of ``video`` into the cache, each in
    its own chunk lifecycle (NAM commits, recaches at prompt switches, context passes)."""
    for chunk in chunks:
        cond = conditions[chunk.segment]
        student.open_chunk(chunk, cond, video)
        student.commit(video[:, :, chunk.start : chunk.stop], cond)


@dataclass
class Rollout:
    """A Self-Forcing rollout.

    Attributes:
        video: ``[B, C, F, h, w]`` float32 clean latents of every chunk.
        exit_inputs: per gradient chunk (by index), the float64 noisy input of its exit step.
        replay_state: the session state before the first gradient chunk (``None`` without one).
    """

    video: torch.Tensor
    exit_inputs: dict[int, torch.Tensor]
    replay_state: dict[str, torch.Tensor] | None


@torch.no_grad()
def self_forcing_rollout(
    student: StreamingStudent,
    chunks: Sequence[ChunkPlan],
    conditions: Sequence[Conditioning],
    noise: torch.Tensor,
    schedule: FlowMatchSchedule,
    randomness: StepRandomness,
    gradient_from: int,
) -> Rollout:
    """Generate every chunk with the few-step schedule, each stopping at its exit step, and keep
    what ``replay_with_gradient`` needs for chunks ``gradient_from ..``.

    Args:
        noise: ``[B, C, F, h, w]`` initial noise of the whole video.
        randomness: draws the re-noising noise between steps.
        gradient_from: index of the first gradient chunk (``len(chunks)`` for none).
    """
    video = torch.zeros_like(noise, dtype=torch.float32)
    exit_inputs: dict[int, torch.Tensor] = {}
    replay_state = None
    for index, chunk in enumerate(chunks):
        if index == gradient_from:
            replay_state = student.session.state_dict()
        cond = conditions[chunk.segment]
        student.open_chunk(chunk, cond, video)
        noisy = noise[:, :, chunk.start : chunk.stop].double()
        for step in range(chunk.exit_step + 1):
            timestep = schedule.timesteps[step]
            flow = student.flow(noisy, timestep, cond, False)
            clean = schedule.predict_clean(noisy, flow, schedule.sigma_at(timestep))
            if step < chunk.exit_step:
                next_sigma = schedule.sigma_at(schedule.timesteps[step + 1])
                eps = randomness.randn(noisy.shape, noisy.device)
                noisy = schedule.renoise(clean, eps, next_sigma)
        if index >= gradient_from:
            exit_inputs[index] = noisy
        video[:, :, chunk.start : chunk.stop] = clean.float()
        student.commit(video[:, :, chunk.start : chunk.stop], cond)
    return Rollout(video, exit_inputs, replay_state)


def replay_with_gradient(
    student: StreamingStudent,
    accelerator: Accelerator,
    rollout: Rollout,
    chunks: Sequence[ChunkPlan],
    conditions: Sequence[Conditioning],
    schedule: FlowMatchSchedule,
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
    student.session.load_state_dict(rollout.replay_state)
    indices = sorted(rollout.exit_inputs)

    def exit_step_loss(index: int, chunk: ChunkPlan, cond: Conditioning) -> torch.Tensor:
        timestep = schedule.timesteps[chunk.exit_step]
        noisy = rollout.exit_inputs[index]
        flow = student.flow(noisy, timestep, cond, True)
        return chunk_loss(index, schedule.predict_clean(noisy, flow, schedule.sigma_at(timestep)))

    return backward_chunk_by_chunk(
        student, accelerator, [(i, chunks[i]) for i in indices], conditions, rollout.video,
        exit_step_loss,
    )


def backward_chunk_by_chunk(
    student: StreamingStudent,
    accelerator: Accelerator,
    chunks: Sequence[tuple[int, ChunkPlan]],
    conditions: Sequence[Conditioning],
    video: torch.Tensor,
    loss_of: Callable[[int, ChunkPlan, Conditioning], torch.Tensor],
) -> torch.Tensor:
    """Open each of ``chunks`` (``(index, plan)``, in order) in turn, backpropagate
    ``loss_of(index, plan, conditioning)`` (a loss of the open chunk's gradient pass), then commit
    the chunk's clean frames of ``video`` ``[B, C, F, h, w]`` before the next.

    Returns:
        The detached sum of the losses.
    """
    losses = []
    for position, (index, chunk) in enumerate(chunks):
        last = position == len(chunks) - 1
        cond = conditions[chunk.segment]
        student.open_chunk(chunk, cond, video)
        # Gradients are all-reduced once, after the last chunk's backward.
        with nullcontext() if last else accelerator.no_sync(student.trained):
            loss = loss_of(index, chunk, cond)
            student.backward(accelerator, loss)
        losses.append(loss.detach())
        if not last:
            student.commit(video[:, :, chunk.start : chunk.stop], cond)
    return sum(losses[1:], start=losses[0])
