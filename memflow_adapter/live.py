"""Playing a stream as it is made: prompts typed while it runs, the mp4 written chunk by chunk,
one progress line per chunk (what ``memflow generate --interactive`` runs)."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from pathlib import Path
from typing import TextIO

import numpy as np

from .extras import import_optional
from .pipeline import StreamingVideoOutput, VideoStream


class LivePrompts:
    """Prompts read from ``lines`` (one a line, e.g. ``sys.stdin``) by a background thread, so
    typing never blocks generation; between chunks the stream takes the newest (a prompt typed
    over before a chunk boundary is skipped)."""

    def __init__(self, lines: TextIO) -> None:
        self._pending: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._read, args=(lines,), daemon=True)
        self._thread.start()

    def _read(self, lines: TextIO) -> None:
        for line in lines:
            if line.strip():
                self._pending.put(line.strip())

    def take(self) -> list[str]:
        """Every prompt typed since the last call, oldest first."""
        typed = []
        while True:
            try:
                typed.append(self._pending.get_nowait())
            except queue.Empty:
                return typed


class VideoFileWriter:
    """An mp4 written as frames come (imageio-ffmpeg, as diffusers' ``export_to_video``).

    Frames are ``[m, H, W, 3]`` float arrays in ``[0, 1]`` (the pipeline's ``"np"`` output)."""

    def __init__(self, path: str | Path, fps: int) -> None:
        imageio = import_optional("imageio", "video", "writing mp4")
        import_optional("imageio_ffmpeg", "video", "writing mp4")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = imageio.get_writer(str(self.path), fps=fps, macro_block_size=16)

    def write(self, frames: np.ndarray) -> None:
        for frame in frames:
            self._writer.append_data((frame * 255).astype(np.uint8))

    def close(self) -> None:
        self._writer.close()


def play(
    stream: VideoStream,
    video_path: str | Path,
    fps: int,
    log: TextIO,
    prompts: LivePrompts | None = None,
) -> StreamingVideoOutput:
    """Run ``stream`` (``output_type="np"``, one video) to the end, appending each chunk's frames
    to ``video_path`` as it comes and printing a line per chunk to ``log``; with ``prompts``,
    the newest prompt typed while a chunk ran applies from the next chunk on.

    Returns:
        The video's output; its ``frames`` are ``None`` (they are in the file).
    """
    if stream.output_type != "np" or stream.noise.shape[0] != 1:
        raise ValueError(
            "play() writes one video from 'np' frames: stream with output_type='np' and "
            f"num_videos=1, got {stream.output_type!r} and {stream.noise.shape[0]}"
        )
    writer = VideoFileWriter(video_path, fps)
    taken = []
    try:
        while stream.next_chunk is not None:
            typed = prompts.take() if prompts is not None else []
            if typed:
                stream.set_prompt(typed[-1])
                skipped = f" ({len(typed) - 1} typed over)" if len(typed) > 1 else ""
                print(f"prompt from latent frame {stream.next_chunk.start}: {typed[-1]!r}"
                      f"{skipped}", file=log, flush=True)
            chunk = next(stream)
            began = time.perf_counter()
            writer.write(chunk.frames[0])
            taken.append(dataclasses.replace(chunk, frames=None))  # the frames are in the file
            report = chunk.report
            print(
                f"chunk {report.chunk_index + 1}/{stream.num_chunks}: latent frames "
                f"{report.start_frame}-{report.start_frame + report.num_frames - 1}"
                f"{' (recached)' if report.recached else ''}, {report.seconds:.2f} s + "
                f"{report.decode_seconds:.2f} s decode + {time.perf_counter() - began:.2f} s "
                f"write, {report.prompt!r}",
                file=log,
                flush=True,
            )
    finally:
        writer.close()
    return stream.output(taken)
