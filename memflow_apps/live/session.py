"""The one generation a ``memflow live`` server runs: a stream made chunk by chunk on a thread of
its own, steered between chunks by the page (prompt, pause, resume, restart, save, stop) and
held back to at most ``chunks_ahead`` chunks the page has not shown yet."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memflow_adapter.outputs import write_outputs
from memflow_adapter.pipeline import MemFlowStreamingPipeline
from memflow_adapter.stream import StreamedChunk, VideoStream
from memflow_apps.shared.videos import VideoFileWriter, as_uint8_frames

from .messages import chunk_message, encode_frame

#: What the session sends: a JSON-able message and the binary messages that follow it.
Emit = Callable[[dict[str, Any], list[bytes]], None]


@dataclass(frozen=True)
class LiveSettings:
    """What a live generation makes and how the page may steer it.

    Attributes:
        model: what is streamed, as the page and report.json name it.
        prompt: the prompt the video starts with (and starts again with on a restart).
        height, width: video size in pixels; max_sequence_length: text tokens per prompt.
        num_latent_frames: the video's length (its noise is drawn at once, ``VideoStream``).
        seed: the first generation's seed (a restart takes its own).
        fps: frames per second of the page's playback and of the saved mp4.
        guidance_scale, negative_prompt: as ``MemFlowStreamingPipeline.stream``.
        output_dir: where each save goes (``save-001``, ``save-002``, ... inside it).
        max_prompt_chars: the longest prompt taken (longer ones are refused, not cut).
        chunks_ahead: how many chunks may be made that the page has not shown yet: a prompt
            typed while a chunk plays applies within this many chunks of it.
        suggestions: prompts the page offers to pick from.
        report: extra entries of a save's report.json (e.g. whether the weights are random).
    """

    model: str
    prompt: str
    height: int
    width: int
    max_sequence_length: int
    num_latent_frames: int = 240
    seed: int = 0
    fps: int = 16
    guidance_scale: float = 1.0
    negative_prompt: str | None = None
    output_dir: Path = Path("outputs/live")
    max_prompt_chars: int = 500
    chunks_ahead: int = 2
    suggestions: tuple[str, ...] = ()
    report: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("height", "width", "max_sequence_length", "num_latent_frames", "fps",
                     "max_prompt_chars", "chunks_ahead"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        clean_prompt(self.prompt, self.max_prompt_chars, "prompt")


def clean_prompt(text: Any, limit: int, name: str = "prompt") -> str:
    """``text`` with its whitespace runs made single spaces (a prompt is text only: one line).

    Raises:
        ValueError: ``text`` is not a string, is empty, or is longer than ``limit`` characters.
    """
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a string, got {type(text).__name__}")
    words = " ".join(text.split())
    if not words:
        raise ValueError(f"{name} must not be empty")
    if len(words) > limit:
        raise ValueError(f"{name} must be at most {limit} characters, got {len(words)}")
    return words


class PromptSlot:
    """The newest prompt not applied yet: one slot, so a prompt replaces the one waiting (a
    client that floods prompts gets its last one applied, nothing queues)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: str | None = None

    def offer(self, text: str) -> str | None:
        """Put ``text`` in the slot; returns the prompt it replaced, if any."""
        with self._lock:
            replaced, self._waiting = self._waiting, text
        return replaced

    def take(self) -> str | None:
        """The waiting prompt (emptying the slot), or ``None``."""
        with self._lock:
            text, self._waiting = self._waiting, None
        return text


class LiveSession:
    """One live generation of ``streaming``: ``start()`` runs it on a thread; the page's commands
    (``offer_prompt``, ``pause``, ``resume``, ``restart``, ``save``, ``shown``, ``stop``) take
    effect between chunks; what happens is sent through ``emit``:

    * ``{"type": "started", "seed", "num_chunks", "schedule"}`` when a stream starts;
    * ``{"type": "applied", "prompt", "chunk", "start_frame"}`` before the chunk a prompt opens;
    * ``{"type": "chunk", ...}`` (``messages.chunk_message``) and its frames as images;
    * ``{"type": "done"}`` after the last chunk, ``{"type": "saved", "folder", "files"}`` after
      a save, ``{"type": "error", "message"}`` if the generation fails (it then stops).
    """

    def __init__(
        self, streaming: MemFlowStreamingPipeline, settings: LiveSettings, emit: Emit
    ) -> None:
        self.streaming = streaming
        self.settings = settings
        self._emit = emit
        self.prompts = PromptSlot()
        #: video frames per latent frame (diffusers pipelines say, else the family's VAE)
        self.temporal_factor = getattr(streaming.pipe, "vae_scale_factor_temporal", None) or (
            streaming.attachment.integration.vae_temporal_factor
        )
        self._changed = threading.Condition()
        self._paused = False
        self._stopped = False
        self._restart: int | None = None
        self._save = False
        self._shown = -1
        #: counts the streams started: a page's ``shown`` of an earlier one is ignored
        self.generation = 0
        self._thread = threading.Thread(target=self._run, name="memflow-live", daemon=True)
        self.stream: VideoStream | None = None
        self.seed = settings.seed
        self._made: list[StreamedChunk] = []
        self._frames: list[np.ndarray] = []

    # ------------------------------------------------------------------------- the page's commands
    def start(self) -> None:
        self._thread.start()

    def offer_prompt(self, text: Any) -> tuple[str, str | None]:
        """Take ``text`` as the prompt from the next chunk on; returns it cleaned and the waiting
        prompt it replaced. ``ValueError`` (``clean_prompt``) leaves the slot as it was."""
        text = clean_prompt(text, self.settings.max_prompt_chars)
        return text, self.prompts.offer(text)

    def pause(self) -> None:
        self._set(_paused=True)

    def resume(self) -> None:
        self._set(_paused=False)

    def restart(self, seed: Any) -> None:
        """Start the video again from its first prompt with ``seed`` (an int >= 0)."""
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in 0..2**63 - 1, got {seed!r}")
        self._set(_restart=seed, _paused=False)

    def save(self) -> None:
        """Write what was made (``save-NNN/``: video.mp4, report.json, memory_timeline.png and
        the stream's state, stream.pt) at the next chunk boundary (at once when paused)."""
        self._set(_save=True)

    def shown(self, chunk_index: Any, generation: Any) -> None:
        """The page has shown chunk ``chunk_index`` of stream ``generation`` (ints): a chunk
        more may be made."""
        for name, value in (("chunk", chunk_index), ("generation", generation)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        with self._changed:
            if generation == self.generation:
                self._shown = max(self._shown, chunk_index)
            self._changed.notify_all()

    def stop(self) -> None:
        """Stop after the chunk being made (the page closed)."""
        self._set(_stopped=True)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the generation thread to end; whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def paused(self) -> bool:
        return self._paused

    def _set(self, **changes: Any) -> None:
        with self._changed:
            for name, value in changes.items():
                setattr(self, name, value)
            self._changed.notify_all()

    # --------------------------------------------------------------------------- the generation
    def _run(self) -> None:
        try:
            self._open(self.settings.seed)
            while True:
                with self._changed:
                    self._changed.wait_for(self._something_to_do)
                    if self._stopped:
                        return
                    restart, self._restart = self._restart, None
                    save, self._save = self._save, False
                if restart is not None:
                    self.prompts.take()  # a prompt typed for the old video does not open the new
                    self._open(restart)
                elif save:
                    self._write()
                else:
                    self._next_chunk()
        except Exception as error:  # the page shows it; the server goes on for the next page
            self._emit({"type": "error", "message": f"{type(error).__name__}: {error}"}, [])

    def _something_to_do(self) -> bool:
        if self._stopped or self._restart is not None or self._save:
            return True
        unshown = len(self._made) - 1 - self._shown
        return (not self._paused and self.stream.next_chunk is not None
                and unshown < self.settings.chunks_ahead)

    def _open(self, seed: int) -> None:
        settings = self.settings
        device = self.streaming.device
        self.stream = self.streaming.stream(
            settings.prompt,
            num_latent_frames=settings.num_latent_frames,
            height=settings.height,
            width=settings.width,
            generator=torch.Generator(device=device).manual_seed(seed),
            max_sequence_length=settings.max_sequence_length,
            fps=settings.fps,
            guidance_scale=settings.guidance_scale,
            negative_prompt=settings.negative_prompt,
        )
        with self._changed:
            self.seed = seed
            self.generation += 1
            self._made, self._frames, self._shown = [], [], -1
        self._emit({"type": "started", "seed": seed, "generation": self.generation,
                    "num_chunks": self.stream.num_chunks,
                    "schedule": self._schedule()}, [])

    def _next_chunk(self) -> None:
        stream = self.stream
        text = self.prompts.take()
        if text is not None:
            stream.set_prompt(text)
            upcoming = stream.next_chunk
            self._emit({"type": "applied", "prompt": text, "chunk": upcoming.index,
                        "start_frame": upcoming.start, "schedule": self._schedule()}, [])
        chunk = next(stream)
        decoded_at = time.monotonic()
        frames = as_uint8_frames(chunk.frames[0])
        images = [encode_frame(frame) for frame in frames]
        first_pixel = sum(len(made) for made in self._frames)
        self._frames.append(frames)
        self._made.append(dataclasses.replace(chunk, frames=None))  # the frames are kept above
        message = chunk_message(chunk, self.streaming.config, first_pixel, self.temporal_factor,
                                decoded_at, images[0][1] if images else "")
        self._emit(message, [data for data, _ in images])
        if stream.next_chunk is None:
            self._emit({"type": "done"}, [])

    def _schedule(self) -> list[list[Any]]:
        return [list(entry) for entry in self.stream.schedule.entries]

    def _write(self) -> None:
        if not self._made:
            self._emit({"type": "error", "message": "nothing to save yet: no chunk was made"}, [])
            return
        folder = _next_folder(Path(self.settings.output_dir))
        writer = VideoFileWriter(folder / "video.mp4", self.settings.fps)
        try:
            for frames in self._frames:
                writer.write(frames)
        finally:
            writer.close()
        stream = self.stream
        extra = {"model": self.settings.model, **self.settings.report, "seed": self.seed,
                 "guidance_scale": self.settings.guidance_scale,
                 "negative_prompt": self.settings.negative_prompt,
                 "prompts": self._schedule(), "interrupted": stream.next_chunk is not None,
                 "planned_chunks": stream.num_chunks}
        paths = write_outputs(stream.output(self._made), self.streaming.config, folder,
                              self.settings.fps, extra, video=writer.path)
        paths["state"] = stream.save(folder / "stream.pt")
        self._emit({"type": "saved", "folder": str(folder),
                    "files": {name: str(path) for name, path in paths.items()}}, [])


def _next_folder(output_dir: Path) -> Path:
    """The first ``save-NNN`` folder that does not exist yet in ``output_dir``, made."""
    output_dir.mkdir(parents=True, exist_ok=True)
    number = 1
    while (output_dir / f"save-{number:03d}").exists():
        number += 1
    folder = output_dir / f"save-{number:03d}"
    folder.mkdir()
    return folder
