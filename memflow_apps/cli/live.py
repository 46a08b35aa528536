"""Playing a stream as it is made: prompts typed (or piped) while it runs, timed prompts from a
file, the mp4 written chunk by chunk, one progress line per chunk, a stop between chunks (what
``memflow generate`` runs)."""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import TextIO

from memflow_adapter.stream import StreamingVideoOutput, VideoStream
from memflow_adapter.streaming import PromptSchedule
from memflow_apps.shared.videos import VideoFileWriter


class LivePrompts:
    """Prompts read from ``lines`` (one a line, e.g. ``sys.stdin``) by a background thread, so
    typing never blocks generation.

    Typed (``one_per_boundary=False``, a terminal): at each chunk boundary the stream takes the
    newest prompt typed during the chunk (one typed over before the boundary is skipped). Piped
    (``one_per_boundary=True``, a file or another program): every line arrives at once, so each
    boundary takes the oldest line not yet used, one line per boundary, as if each had been typed
    during one chunk.
    """

    def __init__(self, lines: TextIO, one_per_boundary: bool) -> None:
        self.one_per_boundary = one_per_boundary
        self._pending: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._read, args=(lines,), daemon=True)
        self._thread.start()

    def _read(self, lines: TextIO) -> None:
        for line in lines:
            if line.strip():
                self._pending.put(line.strip())

    def take(self) -> list[str]:
        """The prompts for this chunk boundary, oldest first: every one typed since the last
        call, or (piped) the oldest line not yet used, if any."""
        typed = []
        while not (self.one_per_boundary and typed):
            try:
                typed.append(self._pending.get_nowait())
            except queue.Empty:
                break
        return typed

    def unused(self) -> int:
        """How many lines read so far no boundary has taken (piped lines past the video's end)."""
        return self._pending.qsize()


def read_prompt_file(path: str | os.PathLike[str], num_latent_frames: int) -> PromptSchedule:
    """Timed prompts for ``memflow generate --prompt-file``: one prompt per line, either
    ``<latent frame> <prompt>`` (``0 a red fox in the snow``) or JSONL
    (``{"frame": 0, "prompt": "a red fox in the snow"}``; the first line decides). Blank lines
    and, in the text form, lines starting with ``#`` are skipped. A prompt applies from the first
    chunk boundary at or after its frame.

    Raises:
        ValueError: naming the file and line: a line of neither form, a frame that is not an int
            >= 0, frames that do not increase from 0, an empty prompt, or a frame at or past
            ``num_latent_frames`` (the prompt would never be shown).
        OSError: the file cannot be read.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"--prompt-file {path}: not UTF-8 text ({error.reason} at byte "
                         f"{error.start})") from error
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)
             if line.strip()]
    json_lines = bool(lines) and lines[0][1].startswith("{")
    if not json_lines:
        lines = [(number, line) for number, line in lines if not line.startswith("#")]
    if not lines:
        raise ValueError(f"--prompt-file {path}: no prompts; expected lines '<latent frame> "
                         "<prompt>' or JSONL {\"frame\": N, \"prompt\": \"...\"}")
    entries: list[tuple[str, int]] = []
    for number, line in lines:
        where = f"--prompt-file {path}, line {number}"
        frame, prompt = _json_entry(line, where) if json_lines else _text_entry(line, where)
        previous = entries[-1][1] if entries else None
        if previous is None and frame != 0:
            raise ValueError(f"{where}: the first prompt must start at latent frame 0, got {frame}")
        if previous is not None and frame <= previous:
            raise ValueError(f"{where}: latent frames must increase, got {frame} after {previous}")
        if frame >= num_latent_frames:
            raise ValueError(f"{where}: latent frame {frame} is past the video's "
                             f"{num_latent_frames} latent frames (--num-latent-frames)")
        entries.append((prompt, frame))
    return PromptSchedule(tuple(entries))


def _text_entry(line: str, where: str) -> tuple[int, str]:
    frame, _, prompt = line.replace("\t", " ").partition(" ")
    if not (frame.isascii() and frame.isdigit()) or not prompt.strip():
        raise ValueError(f"{where}: expected '<latent frame> <prompt>' (an int >= 0, a space, a "
                         f"non-empty prompt), got {line!r}")
    return int(frame), prompt.strip()


def _json_entry(line: str, where: str) -> tuple[int, str]:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not JSON ({error.msg}): {line!r}") from error
    if not isinstance(entry, dict) or set(entry) != {"frame", "prompt"}:
        raise ValueError(f"{where}: expected an object with exactly the keys 'frame' and "
                         f"'prompt', got {line!r}")
    frame, prompt = entry["frame"], entry["prompt"]
    if isinstance(frame, bool) or not isinstance(frame, int) or frame < 0:
        raise ValueError(f"{where}: 'frame' must be an int >= 0, got {frame!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
    return frame, prompt.strip()


def play(
    stream: VideoStream,
    video_path: str | Path,
    fps: int,
    log: TextIO,
    prompts: LivePrompts | None = None,
    stop: threading.Event | None = None,
) -> StreamingVideoOutput:
    """Run ``stream`` (``output_type="np"``, one video) to the end, or until ``stop`` is set
    (checked after each chunk, so at least one is made), appending each chunk's frames to
    ``video_path`` as it comes and printing a line per chunk to ``log``; with ``prompts``, what
    it takes at each chunk boundary (not before the first chunk) applies from the next chunk on.

    Returns:
        The output of the chunks made; its ``frames`` are ``None`` (they are in the file, which
        is closed, playable, whatever ends the loop).
    """
    if stream.output_type != "np" or stream.noise.shape[0] != 1:
        raise ValueError(
            "play() writes one video from 'np' frames: stream with output_type='np' and "
            f"num_videos=1, got {stream.output_type!r} and {stream.noise.shape[0]}"
        )
    writer = VideoFileWriter(video_path, fps)
    taken = []
    try:
        while stream.next_chunk is not None and not (taken and stop is not None and stop.is_set()):
            typed = prompts.take() if prompts is not None and taken else []
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
