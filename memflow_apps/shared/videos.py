"""Video files: finding them in a folder, decoding them into frame batches and writing them as
frames come; shared by ``memflow eval`` (scoring mp4 files), ``recipes.build_dataset`` (encoding
them), ``memflow generate`` and ``memflow live`` (writing them)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memflow_adapter.extras import import_optional

__all__ = [
    "PARTIAL",
    "VIDEO_EXTENSIONS",
    "VideoFileWriter",
    "VideoReadError",
    "as_uint8_frames",
    "iter_video_batches",
    "video_paths",
]

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".gif")
#: The stem suffix of a file still being written (``<stem>.partial.mp4``), then renamed.
PARTIAL = ".partial"


class VideoReadError(RuntimeError):
    """A video file that is missing, cannot be decoded or holds no frames."""


def iter_video_batches(path: str | os.PathLike[str], batch_size: int = 32) -> Iterator[np.ndarray]:
    """Decode a video (PyAV through imageio) into ``[B, H, W, 3]`` uint8 batches.

    Raises:
        VideoReadError: the file is missing, undecodable, or holds no frames.
    """
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"no such file: {path}")
    batch: list[np.ndarray] = []
    count = 0
    try:
        for frame in iio.imiter(path, plugin="pyav"):
            batch.append(frame)
            count += 1
            if len(batch) == batch_size:
                yield as_uint8_frames(np.stack(batch))
                batch = []
    except VideoReadError:
        raise
    except Exception as error:  # PyAV / imageio raise many types for broken files
        message = f"cannot decode {path.name}: {type(error).__name__}: {error}"
        raise VideoReadError(message) from error
    if batch:
        yield as_uint8_frames(np.stack(batch))
    if count == 0:
        raise VideoReadError(f"{path.name} holds no frames")


def video_paths(folder: str | os.PathLike[str]) -> list[Path]:
    """The video files directly inside ``folder`` (unfinished ``*.partial.*`` files excluded)."""
    return sorted(
        path
        for path in Path(folder).iterdir()
        if path.is_file()
        and path.suffix.lower() in VIDEO_EXTENSIONS
        and not path.stem.endswith(PARTIAL)
    )


def as_uint8_frames(frames: Any) -> np.ndarray:
    """``[B, H, W, 3]`` uint8 frames from uint8 or ``[0, 1]`` float arrays / tensors (a single
    ``[H, W, 3]`` frame, grey ``[..., 1]`` and RGBA frames are accepted too)."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    array = np.asarray(frames)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"frames must be [B, H, W, C], got shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        array = array[..., :3]
    elif array.shape[-1] != 3:
        raise ValueError(f"frames must have 1, 3 or 4 channels, got {array.shape[-1]}")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return np.ascontiguousarray(array)


class VideoFileWriter:
    """An mp4 written as frames come (imageio-ffmpeg, as diffusers' ``export_to_video``).

    Frames are ``[m, H, W, 3]``: float arrays in ``[0, 1]`` (the pipeline's ``"np"`` output),
    or uint8."""

    def __init__(self, path: str | Path, fps: int) -> None:
        imageio = import_optional("imageio", "video", "writing mp4")
        import_optional("imageio_ffmpeg", "video", "writing mp4")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = imageio.get_writer(str(self.path), fps=fps, macro_block_size=16)

    def write(self, frames: np.ndarray) -> None:
        for frame in frames:
            self._writer.append_data(
                frame if frame.dtype == np.uint8 else (frame * 255).astype(np.uint8)
            )

    def close(self) -> None:
        self._writer.close()
