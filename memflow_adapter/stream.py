"""A video being streamed and what it yields: ``VideoStream`` (an iterator of ``StreamedChunk``,
one chunk per ``next()``, with live prompts, ``save`` / ``state_dict`` for pausing), each chunk's
``ChunkReport`` (its cost and prompt), and ``StreamingVideoOutput`` (a whole collected video).
``MemFlowStreamingPipeline.stream()`` makes the streams (``pipeline.py``)."""

from __future__ import annotations

import numbers
import os
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers.utils import export_to_video
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from integrations.base import LatentDecoder

from .introspection import ChunkMemory
from .session import StreamingSession
from .streaming import (
    ChunkEngine,
    ChunkPlan,
    Guidance,
    PromptConditioning,
    PromptSchedule,
    RecentLatents,
    StepNoise,
    next_chunk,
)
from .timing import Mark, Stopwatch, hardware_name, seconds_between

if TYPE_CHECKING:
    from .pipeline import MemFlowStreamingPipeline

#: What ``VideoStream.state_dict()`` holds.
STREAM_STATE_KEYS = ("session", "decoder", "recent", "recent_start", "noise", "schedule",
                     "previous", "generator", "arguments")


@dataclass(frozen=True)
class ChunkReport:
    """What one chunk cost and which prompt it used.

    ``seconds`` (generation, recache included) and ``decode_seconds`` (decoding its frames) are
    read from the marks taken while it ran; on CUDA those are events, and reading them waits
    for the chunk's work to finish (the stream itself never does). ``video_frames``: the
    frames it decoded (``None`` for ``"latent"`` output).
    """

    chunk_index: int
    start_frame: int
    num_frames: int
    prompt: str
    recached: bool
    cache_bytes: int
    video_frames: int | None
    marks: tuple[Mark, Mark, Mark] = field(repr=False, compare=False)

    @property
    def seconds(self) -> float:
        return seconds_between(self.marks[0], self.marks[1])

    @property
    def decode_seconds(self) -> float:
        return seconds_between(self.marks[1], self.marks[2])


@dataclass(frozen=True)
class StreamedChunk:
    """What ``stream()`` yields after each chunk.

    Attributes:
        plan: the chunk (index, frames, segment, prompt, whether it recached).
        latents: ``[B, C, f, h, w]`` its clean latents.
        frames: its decoded video frames in the stream's ``output_type`` (``np``:
            ``[B, m, H, W, 3]``, ``pt``: ``[B, m, 3, H, W]``, ``pil``: per video a list of
            images; ``None`` for ``"latent"``); concatenated over chunks they are the video.
        memory: the chunk's memory trace (bank frames, SMA activations).
        report: its timings and cache size.
    """

    plan: ChunkPlan
    latents: torch.Tensor
    frames: Any
    memory: ChunkMemory | None
    report: ChunkReport


@dataclass
class StreamingVideoOutput:
    """Result of one streaming generation.

    Attributes:
        latents: ``[B, C, F, h, w]`` generated clean latents.
        frames: the decoded video in ``output_type`` (``None`` for ``"latent"``).
        trace: the memory trace (bank frames and SMA activations per chunk; empty with
            ``record_trace=False``).
        chunks: per-chunk timings and cache sizes.
        peak_memory_bytes: CUDA peak allocation during the run (``None`` on CPU).
        seconds_to_first_frame: from the start of the stream to the first chunk's frames (or
            latents, for ``"latent"``).
        hardware: what ran it (``timing.hardware_name``).
    """

    latents: torch.Tensor
    frames: Any
    trace: list[ChunkMemory]
    chunks: list[ChunkReport] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    seconds_to_first_frame: float | None = None
    hardware: str | None = None

    @property
    def denoise_fps(self) -> float | None:
        """Video frames per second of the denoising loop (recaches included, decoding not):
        the streaming speed the field reports. ``None`` without decoded frames."""
        return self._fps(decode=False)

    @property
    def end_to_end_fps(self) -> float | None:
        """Video frames per second from latents to decoded frames (VAE decoding included)."""
        return self._fps(decode=True)

    def _fps(self, decode: bool) -> float | None:
        frames = [chunk.video_frames for chunk in self.chunks]
        if not frames or None in frames:
            return None
        seconds = sum(
            chunk.seconds + (chunk.decode_seconds if decode else 0.0) for chunk in self.chunks
        )
        return sum(frames) / seconds

    def save_video(self, path: str | Path, fps: int = 16, batch_index: int = 0) -> Path:
        """Write video ``batch_index`` (``0 .. B - 1``) to ``path`` at ``fps`` frames per
        second (a number > 0; mp4 needs the ``video`` extra)."""
        if self.frames is None:
            raise ValueError("no decoded frames: generate with output_type='np' or 'pil'")
        if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not 0 < fps < np.inf:
            raise ValueError(f"fps must be a finite number > 0 (frames per second), got {fps!r}")
        if isinstance(batch_index, bool) or not isinstance(batch_index, int) or not (
            0 <= batch_index < len(self.frames)
        ):
            raise ValueError(
                f"batch_index must be an int in 0..{len(self.frames) - 1} (the videos "
                f"generated), got {batch_index!r}"
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        export_to_video(list(self.frames[batch_index]), str(path), fps=fps)
        return path


class VideoStream:
    """One video being streamed (``MemFlowStreamingPipeline.stream``): an iterator of
    ``StreamedChunk`` that runs one chunk per ``next()``.

    Between chunks, ``set_prompt(text)`` (or ``send(text)``, which then runs the next chunk)
    starts a new prompt segment at the next chunk; ``save(path)`` and
    ``MemFlowStreamingPipeline.resume(path)`` (or ``state_dict()`` / ``load_state_dict()``)
    pause and resume the stream (session, decoder cache, latents, schedule, noise, generator).

    What it holds: on the device, the session's bounded cache and the clean latents a recache
    can read back (``recent``: the last ``cache_frames`` frames and one chunk; the chunks it
    yields carry their own); in host memory, the video's initial noise ``noise``
    ``[B, C, F, h, w]`` float32 (drawn at once, as diffusers' ``latents``, so that a seed gives
    the same video however it is streamed), one chunk of it moved to the device per chunk.
    """

    def __init__(
        self,
        pipeline: MemFlowStreamingPipeline,
        schedule: PromptSchedule,
        *,
        noise: torch.Tensor,
        step_noise: StepNoise | None,
        generator: torch.Generator | None,
        guidance: Guidance | None,
        session: StreamingSession,
        decoder: LatentDecoder | None,
        output_type: str,
        conditioning: dict[str, Any],
        encode: Callable[[str], torch.Tensor],
        arguments: dict[str, Any],
    ) -> None:
        self.pipeline = pipeline
        self.session = session
        self.noise = noise
        batch, channels, num_frames, height, width = noise.shape
        config = pipeline.config
        self.recent = RecentLatents(
            (batch, channels, height, width), config.cache_frames, config.frames_per_chunk,
            num_frames, pipeline.device,
        )
        self.output_type = output_type
        self._schedule = schedule
        self._given_step_noise = step_noise
        self._generator = generator
        self._arguments = arguments
        self._guidance = guidance
        self._decoder = decoder
        self._encode = encode
        self._conditions: dict[str, PromptConditioning] = {}
        self._previous: ChunkPlan | None = None
        self._engine = ChunkEngine(
            pipeline.transformer, session, pipeline.schedule, dtype=pipeline.dtype,
            conditioning=conditioning,
        )
        self._stopwatch = Stopwatch(pipeline.device)
        self._started = self._stopwatch.mark()
        self._first_frame: Mark | None = None
        if pipeline.device.type == "cuda":  # the output's peak is this stream's
            torch.cuda.reset_peak_memory_stats(pipeline.device)
        for text in schedule.prompts:
            self._condition(text)

    # ------------------------------------------------------------------------------ the stream
    @property
    def schedule(self) -> PromptSchedule:
        """The prompt schedule as it stands (live switches included)."""
        return self._schedule

    @property
    def num_latent_frames(self) -> int:
        return self.noise.shape[2]

    @property
    def num_chunks(self) -> int:
        return -(-self.num_latent_frames // self.pipeline.config.frames_per_chunk)

    @property
    def next_chunk(self) -> ChunkPlan | None:
        """The chunk the next ``next()`` runs, as the schedule stands (``None``: done)."""
        return next_chunk(
            self._previous,
            self._schedule.segment_starts,
            self.num_latent_frames,
            self.pipeline.config.frames_per_chunk,
            self._schedule.prompts,
        )

    def set_prompt(self, prompt: str) -> None:
        """Generate with ``prompt`` from the next chunk on: a new segment starting at its first
        frame (scheduled switches not applied yet are replaced), so that chunk recaches the
        window under ``prompt``, exactly as the same switch given up front would."""
        upcoming = self.next_chunk
        if upcoming is None:
            raise ValueError(
                "the stream is complete: there is no next chunk to switch the prompt of"
            )
        schedule = self._schedule.switched(  # validates the prompt
            prompt, upcoming.start, self.pipeline.config.frames_per_chunk
        )
        self._condition(prompt)
        self._schedule = schedule

    def send(self, prompt: str | None) -> StreamedChunk:
        """``set_prompt(prompt)`` (unless ``None``), then the next chunk (generator style)."""
        if prompt is not None:
            self.set_prompt(prompt)
        return next(self)

    def __iter__(self) -> Iterator[StreamedChunk]:
        return self

    def __next__(self) -> StreamedChunk:
        chunk = self.next_chunk
        if chunk is None:
            raise StopIteration
        attachment = self.pipeline.attachment
        began = self._stopwatch.mark()
        step_noise = self._chunk_step_noise(chunk)
        self.recent.make_room(chunk)
        with torch.no_grad(), attachment.bind(self.session):
            clean = self._engine.step(
                chunk, self._conditions[chunk.prompt], self.noise, self.recent.frames,
                step_noise, self._guidance, video_start=self.recent.start,
            )
            generated = self._stopwatch.mark()
            frames, video_frames = None, None
            if self._decoder is not None:
                video = self._decoder.decode(clean)
                video_frames = video.shape[2]
                frames = self.pipeline.pipe.video_processor.postprocess_video(
                    video, output_type=self.output_type
                )
        decoded = self._stopwatch.mark()
        if self._first_frame is None:
            self._first_frame = decoded
        self._previous = chunk
        report = ChunkReport(
            chunk.index, chunk.start, chunk.num_frames, chunk.prompt, chunk.recache,
            self.session.cache_bytes, video_frames, (began, generated, decoded),
        )
        # a copy: the stream's recent latents feed later recaches and are overwritten later
        memory = self.session.last_chunk_memory()
        return StreamedChunk(chunk, clean.clone(), frames, memory, report)

    def _chunk_step_noise(self, chunk: ChunkPlan) -> StepNoise | None:
        """The re-noising noise of ``chunk``'s steps (``None``: a deterministic schedule draws
        none), drawn in the order the steps use it and checked before the chunk opens, so a
        bad ``step_noise`` leaves the stream as it was."""
        if not self._engine.schedule.stochastic:
            return None
        draw = self._given_step_noise or _drawn_noise(self._generator, self.pipeline.device)
        batch, channels, _, height, width = self.noise.shape
        shape = torch.Size((batch, channels, chunk.num_frames, height, width))
        drawn = []
        for step in range(len(self._engine.schedule.steps) - 1):
            noise = draw(chunk.index, step, shape)
            if not isinstance(noise, torch.Tensor) or noise.shape != shape or not (
                noise.is_floating_point() and torch.isfinite(noise).all()
            ):
                got = (f"shape {tuple(noise.shape)}, {noise.dtype}"
                       if isinstance(noise, torch.Tensor) else type(noise).__name__)
                raise ValueError(
                    f"step_noise({chunk.index}, {step}, shape) must return a finite "
                    f"floating-point tensor of shape {tuple(shape)}, got {got}"
                )
            drawn.append(noise)
        return lambda chunk_index, step, shape: drawn[step]

    def collect(self, progress: bool = False) -> StreamingVideoOutput:
        """Run every chunk and return the whole video (a stream that has not started yet)."""
        require_bool("progress", progress)
        if self._previous is not None:
            raise ValueError(
                f"collect() needs a stream that has not started; {self._previous.index + 1} "
                "chunk(s) were already taken from this one"
            )
        chunks = list(tqdm(self, total=self.num_chunks, disable=not progress,
                           desc="MemFlow chunks"))
        frames = _concatenate_frames([chunk.frames for chunk in chunks], self.output_type)
        return self.output(chunks, frames)

    def output(self, chunks: Sequence[StreamedChunk], frames: Any = None) -> StreamingVideoOutput:
        """The video so far as one output: the latents of ``chunks`` (those taken from this
        stream, in order) along the frame axis, ``frames`` as given, their memory traces and
        reports and the CUDA peak since the stream started."""
        device = self.pipeline.device
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        latents = (
            torch.cat([chunk.latents for chunk in chunks], dim=2)
            if chunks else self.recent.frames[:, :, :0].clone()
        )
        return StreamingVideoOutput(
            latents,
            frames,
            [chunk.memory for chunk in chunks if chunk.memory is not None],
            [chunk.report for chunk in chunks],
            peak,
            self.seconds_to_first_frame,
            hardware_name(device),
        )

    @property
    def seconds_to_first_frame(self) -> float | None:
        """From the start of the stream to the first chunk's frames (latents for ``"latent"``);
        ``None`` before the first chunk."""
        if self._first_frame is None:
            return None
        return seconds_between(self._started, self._first_frame)

    # ----------------------------------------------------------------------------- pause/resume
    def state_dict(self) -> dict[str, Any]:
        """Everything the next chunk depends on, as tensors and built-in types (``torch.load(
        weights_only=True)`` reads it): the session state, the decoder's cache, the recent
        latents, the initial noise, the schedule, the last chunk, the generator's state and
        device, and the stream's arguments. ``MemFlowStreamingPipeline.resume`` makes the
        stream again from it; loading it into a stream made with the same arguments continues
        the video bit-identically."""
        generator = None
        if self._generator is not None:
            generator = {"state": self._generator.get_state(),
                         "device": str(self._generator.device)}
        return {
            "session": self.session.state_dict(),
            "decoder": None if self._decoder is None else self._decoder.state(),
            "recent": self.recent.frames.clone(),
            "recent_start": self.recent.start,
            "noise": self.noise.clone(),
            "schedule": [list(entry) for entry in self._schedule.entries],
            "previous": None if self._previous is None else self._previous.to_state(),
            "generator": generator,
            "arguments": {**self._arguments,
                          "step_noise_given": self._given_step_noise is not None},
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Pause: write ``state_dict()`` to ``path`` (``torch.save``; parent folders are
        created). ``MemFlowStreamingPipeline.resume(path)`` continues it, in any process."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path)
        return path

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a ``state_dict()`` of a stream made with the same arguments (the
        generator, and whether there is one, are the state's). On a bad state nothing changes.
        """
        previous, schedule = self._check_state(state)
        for text in schedule.prompts:
            self._condition(text)
        current = self.state_dict()
        try:
            self._load(state, schedule, previous)
        except BaseException:
            self._load(current, self._schedule, self._previous)
            raise

    def _check_state(self, state: Mapping[str, Any]) -> tuple[ChunkPlan | None, PromptSchedule]:
        """``state``'s last chunk and schedule; ``ValueError`` naming what does not fit."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a VideoStream.state_dict(), got {type(state).__name__}")
        missing = [key for key in STREAM_STATE_KEYS if key not in state]
        if missing:
            raise ValueError(
                f"state is missing {missing}: expected a VideoStream.state_dict() (keys "
                f"{list(STREAM_STATE_KEYS)})"
            )
        for key, expected, what in (("noise", self.noise, "a video"),
                                    ("recent", self.recent.frames, "recent latents")):
            if not isinstance(state[key], torch.Tensor) or state[key].shape != expected.shape:
                got = (tuple(state[key].shape) if isinstance(state[key], torch.Tensor)
                       else type(state[key]).__name__)
                raise ValueError(
                    f"the state is of {what} of shape {got} (state[{key!r}]), this stream "
                    f"makes {tuple(expected.shape)}"
                )
        start = state["recent_start"]
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"state['recent_start'] must be an int >= 0, got {start!r}")
        theirs = {k: v for k, v in state["arguments"].items() if k != "step_noise_given"}
        differ = sorted(k for k in self._arguments.keys() | theirs.keys()
                        if self._arguments.get(k) != theirs.get(k))
        if differ:
            raise ValueError(
                "the state is of a stream made with "
                + ", ".join(f"{k}={theirs.get(k)!r}" for k in differ)
                + ", this one has " + ", ".join(f"{k}={self._arguments.get(k)!r}" for k in differ)
                + ": make the stream with the same arguments, or use pipe.resume(state)"
            )
        generator = state["generator"]
        if generator is not None and not (
            isinstance(generator, Mapping) and isinstance(generator.get("state"), torch.Tensor)
            and isinstance(generator.get("device"), str)
        ):
            raise ValueError(
                "state['generator'] must be None or {'state': ByteTensor, 'device': str}, got "
                f"{generator!r}"
            )
        try:
            schedule = PromptSchedule(tuple(tuple(entry) for entry in state["schedule"]))
            previous = state["previous"] and ChunkPlan.from_state(state["previous"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"state holds a bad schedule or last chunk: {error}") from None
        return previous, schedule

    def _load(
        self, state: Mapping[str, Any], schedule: PromptSchedule, previous: ChunkPlan | None
    ) -> None:
        device = self.pipeline.device
        self.session.load_state_dict(state["session"])
        if self._decoder is not None:
            self._decoder.load_state(_moved(state["decoder"], device))
        self.recent.frames.copy_(state["recent"])
        self.recent.start = state["recent_start"]
        self.noise = state["noise"].clone().to(self.noise.device)
        self._schedule = schedule
        self._previous = previous
        saved = state["generator"]
        if saved is None:
            self._generator = None
        else:
            if self._generator is None or str(self._generator.device) != saved["device"]:
                self._generator = torch.Generator(device=saved["device"])
            self._generator.set_state(saved["state"].cpu())

    def _condition(self, text: str) -> PromptConditioning:
        """The prompt's embeddings and NAM text keys, computed once per distinct prompt."""
        if text not in self._conditions:
            with torch.no_grad():
                self._conditions[text] = PromptConditioning.of(
                    self.pipeline.attachment, self._encode(text)
                )
        return self._conditions[text]


def _concatenate_frames(frames: list[Any], output_type: str) -> Any:
    """Per-chunk decoded frames -> the video's, along the frame axis."""
    if output_type == "latent":
        return None
    if output_type == "np":
        return np.concatenate(frames, axis=1)
    if output_type == "pt":
        return torch.cat(frames, dim=1)
    return [sum((chunk[b] for chunk in frames), []) for b in range(len(frames[0]))]


def require_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def load_stream_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``VideoStream.save(path)`` file, read with ``torch.load(weights_only=True)`` onto the
    CPU (tensors and built-in types only: nothing else is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved stream at {str(path)!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ValueError(
            f"{str(path)!r} is not a saved stream (VideoStream.save): {type(error).__name__}: "
            f"{error}"
        ) from error


def _moved(value: Any, device: torch.device) -> Any:
    """``value`` (tensors in nested lists and dicts) with its tensors on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _moved(item, device) for key, item in value.items()}
    if isinstance(value, list):
        return [_moved(item, device) for item in value]
    return value


def _drawn_noise(generator: torch.Generator | None, device: torch.device) -> StepNoise:
    def draw(chunk_index: int, step_index: int, shape: torch.Size) -> torch.Tensor:
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    return draw
