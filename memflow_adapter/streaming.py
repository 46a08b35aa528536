"""One streaming loop (architecture s.5b): the chunk plan and the chunk step every caller drives.

The pipeline, the recipes, the eval and the narrative world all run a video the same way::

    plan = schedule.plan(num_latent_frames, config.frames_per_chunk)   # or next_chunk(...) live
    engine = ChunkEngine(transformer, session, FlowMatchSchedule(), conditioning=...)
    with attachment.bind(session):
        for chunk in plan:
            clean = engine.step(chunk, conditions[chunk.segment], noise, video, step_noise)

``ChunkEngine.chunks`` is the loop itself: for each planned chunk it runs ``open_chunk`` (NAM's
commit, then the recache pass when the plan says so), with initial noise ``denoise`` (the
few-step passes, read-only, up to an exit step), yields the open chunk to the caller (the
training recipes run their gradient passes there with ``flow(..., grad=True)``) and then
``commit`` (the context pass). ``ChunkEngine.step`` is that loop over one chunk.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from .schedule import FlowMatchSchedule
from .session import StreamingSession

#: ``step_noise(chunk_index, step_index, shape) -> noise`` for re-noising between steps.
StepNoise = Callable[[int, int, torch.Size], torch.Tensor]


# ------------------------------------------------------------------------------ the chunk plan
@dataclass(frozen=True)
class ChunkPlan:
    """One chunk of a video: latent frames ``start .. stop - 1``, generated with the prompt of
    segment ``segment`` (``prompt``: its text, when the schedule has texts), opening with a KV
    recache iff its segment differs from the previous chunk's."""

    index: int
    start: int
    stop: int
    segment: int
    recache: bool
    prompt: str | None = None

    @property
    def num_frames(self) -> int:
        return self.stop - self.start

    def to_state(self) -> dict[str, Any]:
        """Its fields as a plain dict (``torch.load(weights_only=True)`` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ChunkPlan:
        """The chunk a ``to_state()`` dict describes; ``ValueError`` naming a missing or
        mistyped field."""
        if not isinstance(state, Mapping):
            raise ValueError(f"a chunk plan state must be a dict, got {type(state).__name__}")
        for name in ("index", "start", "stop", "segment"):
            value = state.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"chunk plan field {name!r} must be an int >= 0, got {value!r}")
        if not isinstance(state.get("recache"), bool):
            raise ValueError(f"chunk plan field 'recache' must be a bool, got "
                             f"{state.get('recache')!r}")
        if not isinstance(state.get("prompt"), (str, type(None))):
            raise ValueError(f"chunk plan field 'prompt' must be a str or None, got "
                             f"{state.get('prompt')!r}")
        if state["stop"] <= state["start"]:
            raise ValueError(f"chunk plan stop must be after start, got {state['start']}.."
                             f"{state['stop']}")
        return cls(**{name: state[name] for name in
                      ("index", "start", "stop", "segment", "recache", "prompt")})


def segment_at(frame: int, segment_starts: Sequence[int]) -> int:
    """The segment latent frame ``frame`` is in: the last one starting at or before it.

    ``segment_starts``: ascending first latent frames of the segments, the first 0."""
    return bisect.bisect_right(segment_starts, frame) - 1


def next_chunk(
    previous: ChunkPlan | None,
    segment_starts: Sequence[int],
    num_latent_frames: int,
    frames_per_chunk: int,
    prompts: Sequence[str] | None = None,
) -> ChunkPlan | None:
    """The chunk after ``previous`` (``None``: the first), or ``None`` past the video's end.

    A chunk takes the segment its first frame is in, so a switch applies at the first chunk
    boundary at or after its frame (a switch at 40 with 3-frame chunks is applied at 42). Only
    segments starting at or before the chunk's first frame matter, so a schedule that grows while
    a video streams plans exactly what the grown schedule would have planned up front.
    """
    _check_layout(segment_starts, num_latent_frames, frames_per_chunk, prompts)
    index = 0 if previous is None else previous.index + 1
    start = 0 if previous is None else previous.stop
    if start >= num_latent_frames:
        return None
    segment = segment_at(start, segment_starts)
    return ChunkPlan(
        index=index,
        start=start,
        stop=min(start + frames_per_chunk, num_latent_frames),
        segment=segment,
        recache=previous is not None and segment != previous.segment,
        prompt=None if prompts is None else prompts[segment],
    )


def plan_chunks(
    segment_starts: Sequence[int],
    num_latent_frames: int,
    frames_per_chunk: int,
    prompts: Sequence[str] | None = None,
) -> list[ChunkPlan]:
    """Every chunk of a ``num_latent_frames`` video whose prompt segments start at latent frames
    ``segment_starts`` (``next_chunk`` says how a chunk is planned); the last chunk may be
    shorter than ``frames_per_chunk``."""
    chunks: list[ChunkPlan] = []
    while (chunk := next_chunk(chunks[-1] if chunks else None, segment_starts,
                               num_latent_frames, frames_per_chunk, prompts)) is not None:
        chunks.append(chunk)
    return chunks


def applied_segment_starts(
    segment_starts: Sequence[int], num_latent_frames: int, frames_per_chunk: int
) -> list[int]:
    """The latent frame each segment really starts at in a streamed video: the first frame of its
    first chunk (``ceil(start / frames_per_chunk) * frames_per_chunk``).

    Raises:
        ValueError: a segment gets no chunk (it starts past the video's end, or a later segment
            starts before the next chunk boundary).
    """
    firsts: dict[int, int] = {}
    for chunk in plan_chunks(segment_starts, num_latent_frames, frames_per_chunk):
        firsts.setdefault(chunk.segment, chunk.start)
    missing = [s for s in range(len(segment_starts)) if s not in firsts]
    if missing:
        raise ValueError(
            f"segments {missing} (starting at latent frames "
            f"{[segment_starts[s] for s in missing]}) get no chunk of {frames_per_chunk} frames "
            f"in a {num_latent_frames}-frame video: use more latent frames or fewer frames per "
            "prompt"
        )
    return [firsts[s] for s in range(len(segment_starts))]


def _check_layout(
    segment_starts: Sequence[int],
    num_latent_frames: int,
    frames_per_chunk: int,
    prompts: Sequence[str] | None,
) -> None:
    for name, value in (("num_latent_frames", num_latent_frames),
                        ("frames_per_chunk", frames_per_chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    starts = list(segment_starts)
    increasing = all(a < b for a, b in zip(starts, starts[1:], strict=False))
    if not starts or starts[0] != 0 or not increasing:
        raise ValueError(f"segment_starts must increase from 0, got {starts}")
    if prompts is not None and len(prompts) != len(starts):
        raise ValueError(
            f"prompts must hold one prompt per segment ({len(starts)}), got {len(prompts)}"
        )


@dataclass(frozen=True)
class PromptSchedule:
    """Which prompt each chunk is generated with: ``(prompt, start_frame)`` entries in latent
    frames, one per segment. A chunk uses the segment its first frame is in, so a switch takes
    effect at the first chunk boundary at or after its frame."""

    entries: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.entries, tuple) or not all(
            isinstance(entry, tuple) and len(entry) == 2 for entry in self.entries
        ):
            raise TypeError(
                f"entries must be a tuple of (prompt, start_frame) tuples, got {self.entries!r}"
            )
        if not self.entries:
            raise ValueError("a prompt schedule needs at least one (prompt, start_frame) entry")
        previous = -1
        for prompt, start in self.entries:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"every prompt must be a non-empty string, got {prompt!r}")
            if isinstance(start, bool) or not isinstance(start, int) or start <= previous:
                raise ValueError(
                    f"start frames must be increasing ints, got {start!r} after {previous}"
                )
            previous = start
        if self.entries[0][1] != 0:
            raise ValueError(f"the first prompt must start at frame 0, got {self.entries[0][1]}")

    @classmethod
    def from_prompts(cls, prompts: Sequence[str], frames_per_prompt: int) -> PromptSchedule:
        """One prompt every ``frames_per_prompt`` latent frames."""
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a list of str, got the str {prompts!r}")
        if isinstance(frames_per_prompt, bool) or not isinstance(frames_per_prompt, int) or (
            frames_per_prompt < 1
        ):
            raise ValueError(f"frames_per_prompt must be an int >= 1, got {frames_per_prompt!r}")
        return cls(tuple((prompt, i * frames_per_prompt) for i, prompt in enumerate(prompts)))

    @property
    def prompts(self) -> list[str]:
        return [prompt for prompt, _ in self.entries]

    @property
    def segment_starts(self) -> list[int]:
        return [start for _, start in self.entries]

    def segment_at(self, frame: int) -> int:
        return segment_at(frame, self.segment_starts)

    def prompt_at(self, frame: int) -> str:
        return self.entries[self.segment_at(frame)][0]

    def plan(self, num_latent_frames: int, frames_per_chunk: int) -> list[ChunkPlan]:
        """Every chunk of a ``num_latent_frames`` video (``plan_chunks``), with its prompt."""
        return plan_chunks(self.segment_starts, num_latent_frames, frames_per_chunk, self.prompts)

    def switched(self, prompt: str, start_frame: int, frames_per_chunk: int) -> PromptSchedule:
        """This schedule with a new segment of ``prompt`` from chunk boundary ``start_frame`` on.
        Entries that a stream in ``frames_per_chunk``-frame chunks has not applied before
        ``start_frame`` are replaced: a live prompt change overrides what was planned."""
        if start_frame % frames_per_chunk:
            raise ValueError(
                f"start_frame must be a chunk boundary (a multiple of {frames_per_chunk}), got "
                f"{start_frame}"
            )
        kept = tuple(
            (text, start) for text, start in self.entries
            if -(-start // frames_per_chunk) * frames_per_chunk < start_frame
        )
        return PromptSchedule((*kept, (prompt, start_frame)))


# ------------------------------------------------------------------------------ the chunk step
@dataclass(frozen=True)
class PromptConditioning:
    """One prompt: its embeddings ``[B, L, D]`` and NAM's per-layer text keys
    ``[B, L, H, D]`` (as the streamed transformer's cross-attention computes them)."""

    embeds: torch.Tensor
    text_keys: list[torch.Tensor]

    @classmethod
    def of(cls, attachment: Any, embeds: torch.Tensor) -> PromptConditioning:
        """``embeds`` with the text keys of ``attachment`` (a ``MemFlowAttachment``)."""
        with torch.no_grad():
            return cls(embeds, attachment.text_keys(embeds))


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: its scale and the negative embeddings ``[B, L, D]``
    (``None``: zeros shaped like each prompt's)."""

    scale: float
    negative: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not 1.0 <= self.scale < math.inf:
            raise ValueError(
                f"guidance_scale must be finite and >= 1 (1 disables guidance), got {self.scale}"
            )

    def negative_for(self, embeds: torch.Tensor) -> torch.Tensor:
        """The negative embeddings to pair with prompt embeddings ``embeds``."""
        return torch.zeros_like(embeds) if self.negative is None else self.negative


def guided_flow(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)`` (``cond`` when ``uncond`` is
    ``None``, i.e. no guidance)."""
    return cond if uncond is None else uncond + scale * (cond - uncond)


def call_transformer(
    model: nn.Module,
    latents: torch.Tensor,
    timestep: float | torch.Tensor,
    embeds: torch.Tensor,
    dtype: torch.dtype,
    conditioning: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """One transformer forward (with MemFlow attached, call it inside a session pass).

    Args:
        model: a transformer of a supported family (maybe wrapped by DDP / FSDP).
        latents: ``[B, C, F, h, w]``; made contiguous so that a slice of a video and a copy of the
            same frames take the same kernels (bit-identical keys and values).
        timestep: one model timestep for every sample, or ``[B]``.
        embeds: ``[B, L, D]`` prompt embeddings.
        dtype: the transformer's compute dtype.
        conditioning: the family's extra forward inputs (``Integration.conditioning_inputs``).

    Returns:
        ``[B, C, F, h, w]`` the predicted flow ``v`` in the model's output dtype.
    """
    timesteps = torch.as_tensor(timestep, dtype=torch.float32, device=latents.device)
    timesteps = timesteps.expand(latents.shape[0]).contiguous()
    return model(
        hidden_states=latents.to(dtype).contiguous(),
        timestep=timesteps,
        encoder_hidden_states=embeds.to(dtype),
        return_dict=False,
        **(conditioning or {}),
    )[0]


class RecentLatents:
    """The clean latents a stream still needs, in a tensor of bounded size: the last ``keep``
    frames before the next chunk (what its recache can read back, ``MemFlowConfig.cache_frames``)
    and that chunk's own frames. A stream of any length holds these, not the whole video.

    ``frames`` ``[B, C, capacity, h, w]`` float32 holds latent frames ``start ..``, where
    ``capacity`` is ``keep + chunk_frames`` (the whole video when ``keep`` is ``None``, an
    unbounded window, or the video is shorter).
    """

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        keep: int | None,
        chunk_frames: int,
        num_latent_frames: int,
        device: torch.device | str,
    ) -> None:
        batch, channels, height, width = shape
        capacity = num_latent_frames
        if keep is not None:
            capacity = min(num_latent_frames, keep + chunk_frames)
        self.keep = keep
        self.start = 0
        self.frames = torch.zeros(
            batch, channels, capacity, height, width, dtype=torch.float32, device=device
        )

    def make_room(self, chunk: ChunkPlan) -> None:
        """Before ``chunk``: drop the frames older than the last ``keep`` before its start when
        it would not fit otherwise (moving the kept ones to the front)."""
        if chunk.stop - self.start <= self.frames.shape[2]:
            return
        first = chunk.start - self.keep
        kept = self.frames[:, :, first - self.start : chunk.start - self.start].clone()
        self.frames[:, :, : self.keep] = kept
        self.start = first


class Denoised(NamedTuple):
    """A denoised chunk: ``clean`` ``[B, C, f, h, w]`` float64, the last step's clean estimate,
    and ``exit_input``, the noisy float64 input of that step."""

    clean: torch.Tensor
    exit_input: torch.Tensor


@dataclass(frozen=True)
class OpenChunk:
    """What ``ChunkEngine.chunks`` yields: a chunk the engine has opened (NAM's commit and its
    recache done), before its context pass.

    Attributes:
        chunk: its plan.
        cond: the prompt it is generated with.
        frames: where its clean frames ``[B, C, f, h, w]`` float32 are in the caller's video
            (a view): denoised, written there already; teacher-forced, the frames committed.
        denoised: with initial noise, its denoised state (``Denoised``), else ``None``.
        last: whether it is the last chunk of the iteration.
    """

    chunk: ChunkPlan
    cond: PromptConditioning
    frames: torch.Tensor
    denoised: Denoised | None
    last: bool


class ChunkEngine:
    """Runs planned chunks through a session with one model (bind the session first): each chunk's
    latents ``[B, C, f, h, w]`` (``f``: its latent frames) are denoised from noise of that shape,
    conditioned on a ``PromptConditioning`` (embeddings ``[B, L, D]``), and committed to the
    session's cache by a context pass.

    Args:
        model: the transformer with MemFlow attached; passes without gradient go through it.
        session: the video's session, bound to ``model``'s attachment by the caller.
        schedule: the few-step denoising schedule.
        dtype: the transformer's compute dtype (default: its parameters').
        conditioning: the family's extra forward inputs (``Integration.conditioning_inputs``).
        trained: the module that gradient passes go through (the same transformer wrapped by
            DDP / FSDP for training); default ``model``.
    """

    def __init__(
        self,
        model: nn.Module,
        session: StreamingSession,
        schedule: FlowMatchSchedule,
        *,
        dtype: torch.dtype | None = None,
        conditioning: Mapping[str, Any] | None = None,
        trained: nn.Module | None = None,
    ) -> None:
        self.model = model
        self.session = session
        self.schedule = schedule
        self.dtype = dtype or next(model.parameters()).dtype
        self.conditioning = dict(conditioning or {})
        self.trained = model if trained is None else trained

    def chunks(
        self,
        chunks: Sequence[ChunkPlan],
        conditions: Sequence[PromptConditioning] | Mapping[int, PromptConditioning],
        video: torch.Tensor,
        *,
        video_start: int = 0,
        noise: torch.Tensor | None = None,
        step_noise: StepNoise | None = None,
        guidance: Guidance | None = None,
        exit_steps: Sequence[int] | Mapping[int, int] | None = None,
        commit_last: bool = True,
    ) -> Iterator[OpenChunk]:
        """The chunk loop: each of ``chunks`` (in plan order, the first starting at the session's
        next frame) is opened, denoised when ``noise`` is given, yielded while open, and
        committed (context pass) when the caller asks for the next one.

        Args:
            conditions: the prompt of each chunk, looked up by its ``segment``.
            video: ``[B, C, F', h, w]`` float32 clean latents of frames ``video_start ..``: the
                recache reads its past frames; a denoised chunk's frames are written into it,
                and each chunk's frames there are what its context pass commits (without
                ``noise``: teacher forcing on ``video``).
            video_start: the absolute latent frame of ``video``'s first frame.
            noise: ``[B, C, F, h, w]`` the initial noise of the video (or of at least these
                chunks' frames, indexed by absolute frame), on any device; ``None``: nothing
                is denoised.
            step_noise, guidance: as ``denoise``.
            exit_steps: each chunk's exit step, looked up by its ``index`` (``None``: the last
                step of every chunk).
            commit_last: commit the last chunk too; ``False`` leaves it open after the loop
                (its context pass would write a cache nobody reads).

        Yields:
            ``OpenChunk`` per chunk; the caller may run read-only and gradient passes on it.
        """
        for position, chunk in enumerate(chunks):
            cond = conditions[chunk.segment]
            self.open_chunk(chunk, cond, video, video_start)
            frames = video[:, :, chunk.start - video_start : chunk.stop - video_start]
            denoised = None
            if noise is not None:
                exit_step = None if exit_steps is None else exit_steps[chunk.index]
                chunk_noise = noise[:, :, chunk.start : chunk.stop].to(video.device)
                denoised = self.denoise(
                    chunk_noise, cond, chunk.index, step_noise, guidance, exit_step
                )
                frames[:] = denoised.clean.float()
            last = position == len(chunks) - 1
            yield OpenChunk(chunk, cond, frames, denoised, last)
            if commit_last or not last:
                self.commit(frames, cond)

    def step(
        self,
        chunk: ChunkPlan,
        cond: PromptConditioning,
        noise: torch.Tensor,
        video: torch.Tensor,
        step_noise: StepNoise | None = None,
        guidance: Guidance | None = None,
        *,
        video_start: int = 0,
        exit_step: int | None = None,
    ) -> torch.Tensor:
        """The whole chunk (``chunks`` over ``chunk`` alone): open it (NAM, recache), denoise
        ``noise[:, :, start:stop]`` up to ``exit_step`` (default the last step), write the clean
        chunk into ``video`` and commit it (context pass).

        Args:
            noise: ``[B, C, F, h, w]`` the initial noise of the video (or of at least this chunk's
                frames, indexed by absolute frame), on any device: the chunk's frames are moved
                to ``video``'s.
            video: ``[B, C, F', h, w]`` float32 clean latents of frames ``video_start ..``: the
                recache reads its past frames, this chunk's frames are written into it (a
                ``RecentLatents.frames`` holds just those; a whole video with ``video_start``
                0 does too).
            video_start: the absolute latent frame of ``video``'s first frame.

        Returns:
            ``[B, C, f, h, w]`` float32, the clean chunk (a view of ``video``).
        """
        exit_steps = None if exit_step is None else {chunk.index: exit_step}
        # unpacking runs the loop to its end, the context pass included
        (opened,) = self.chunks(
            [chunk], {chunk.segment: cond}, video, video_start=video_start, noise=noise,
            step_noise=step_noise, guidance=guidance, exit_steps=exit_steps,
        )
        return opened.frames

    def open_chunk(
        self, chunk: ChunkPlan, cond: PromptConditioning, video: torch.Tensor,
        video_start: int = 0,
    ) -> None:
        """NAM's commit for ``chunk`` (scored with ``cond``'s text keys), then, when the plan
        says so, the recache pass over the clean frames that the session asks for, read from
        ``video`` ``[B, C, F', h, w]`` (frames ``video_start ..``).

        Raises:
            ValueError: ``chunk.start`` is not the session's next frame (chunks run in plan
                order, each after the previous one's context pass).
        """
        if chunk.start != self.session.next_frame:
            raise ValueError(
                f"chunk.start must be the session's next frame ({self.session.next_frame}), got "
                f"{chunk.start} (chunk {chunk.index}): run the plan's chunks in order, each "
                "after the previous one's commit"
            )
        self.session.begin_chunk(cond.text_keys)
        if chunk.recache:
            with torch.no_grad(), self.session.switch_prompt() as window:
                if window.start_frame < video_start:
                    raise ValueError(
                        f"the recache needs latent frames {window.start_frame}.."
                        f"{window.stop_frame - 1}; video starts at frame {video_start}"
                    )
                first = window.start_frame - video_start
                frames = video[:, :, first : first + window.num_frames]
                self._call(self.model, frames, 0.0, cond.embeds)

    def flow(
        self,
        noisy: torch.Tensor,
        timestep: float | torch.Tensor,
        embeds: torch.Tensor,
        grad: bool = False,
    ) -> torch.Tensor:
        """One read-only pass over the open chunk: the predicted flow for ``noisy``
        ``[B, C, f, h, w]`` at ``timestep`` (a float or ``[B]``); with ``grad``, through
        ``trained`` with autograd on."""
        model = self.trained if grad else self.model
        with torch.set_grad_enabled(grad), self.session.denoise_pass():
            return self._call(model, noisy, timestep, embeds)

    def denoise(
        self,
        noise: torch.Tensor,
        cond: PromptConditioning,
        chunk_index: int,
        step_noise: StepNoise | None = None,
        guidance: Guidance | None = None,
        exit_step: int | None = None,
    ) -> Denoised:
        """Few-step denoising of the open chunk from ``noise`` ``[B, C, f, h, w]``, without
        gradient, in read-only passes.

        Between steps the clean estimate is re-noised to the next step's sigma: with fresh
        ``step_noise(chunk_index, step, shape)`` when the schedule is stochastic, with the model's
        own noise estimate otherwise. With ``guidance`` every step also runs the negative
        embeddings (reading the same memory). ``exit_step`` stops after that step
        (Self-Forcing's random exit); default the last.
        """
        timesteps = self.schedule.timesteps
        last = len(timesteps) - 1 if exit_step is None else exit_step
        if not 0 <= last < len(timesteps):
            raise ValueError(f"exit_step must be in 0..{len(timesteps) - 1}, got {exit_step}")
        if self.schedule.stochastic and last > 0 and step_noise is None:
            raise ValueError("a stochastic schedule needs step_noise to re-noise between steps")
        noisy = noise.double()
        for step in range(last):
            clean, flow = self._estimate(noisy, float(timesteps[step]), cond, guidance)
            if self.schedule.stochastic:
                eps = step_noise(chunk_index, step, noise.shape).to(noise.device)
            else:
                eps = self.schedule.predict_noise(clean, flow)
            noisy = self.schedule.renoise(clean, eps, self.schedule.sigma_at(timesteps[step + 1]))
        clean, _ = self._estimate(noisy, float(timesteps[last]), cond, guidance)
        return Denoised(clean, noisy)

    def _estimate(
        self,
        noisy: torch.Tensor,
        timestep: float,
        cond: PromptConditioning,
        guidance: Guidance | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One denoising step's float64 clean estimate of ``noisy`` and the (guided) flow."""
        flow = self.flow(noisy, timestep, cond.embeds)
        if guidance is not None:
            negative = guidance.negative_for(cond.embeds)
            flow = guided_flow(flow, self.flow(noisy, timestep, negative), guidance.scale)
        return self.schedule.predict_clean(noisy, flow, self.schedule.sigma_at(timestep)), flow

    def commit(self, clean: torch.Tensor, cond: PromptConditioning) -> None:
        """The context pass: writes the clean chunk ``[B, C, f, h, w]`` into the cache at
        timestep 0 and closes the chunk."""
        with torch.no_grad(), self.session.context_pass():
            self._call(self.model, clean, 0.0, cond.embeds)

    def backward(
        self, loss: torch.Tensor, backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
    ) -> None:
        """Backpropagate ``loss`` of the open chunk's gradient pass with ``backward`` (e.g.
        ``accelerator.backward``) inside a read-only pass: with gradient checkpointing the blocks
        recompute their self-attention during backward and must attend to the cache the forward
        saw."""
        with self.session.denoise_pass():
            backward(loss)

    def _call(
        self, model: nn.Module, latents: torch.Tensor, timestep: float | torch.Tensor,
        embeds: torch.Tensor,
    ) -> torch.Tensor:
        return call_transformer(model, latents, timestep, embeds, self.dtype, self.conditioning)
