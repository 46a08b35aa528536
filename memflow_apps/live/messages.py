"""What the live page is sent about a chunk: its frames as images, and its report, memory and
the latent-to-pixel frame mapping as JSON (plain data, no web library needed)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from memflow_adapter.config import MemFlowConfig
from memflow_adapter.stream import StreamedChunk

#: Frames up to this many pixels go as PNG (lossless: a 32x32 world frame is a few hundred bytes
#: and JPEG's blocks would smear its pixels when the page enlarges them); larger ones as JPEG,
#: several times faster to encode at 480x832.
LOSSLESS_MAX_PIXELS = 256 * 256
JPEG_QUALITY = 90


def encode_frame(frame: np.ndarray) -> tuple[bytes, str]:
    """``[H, W, 3]`` uint8 -> (image bytes, MIME type): PNG up to ``LOSSLESS_MAX_PIXELS``
    pixels, JPEG above."""
    from PIL import Image  # a dependency of imageio (the video extra) and of diffusers

    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be a [H, W, 3] uint8 array, got {frame.dtype} "
                         f"{tuple(frame.shape)}")
    buffer = io.BytesIO()
    image = Image.fromarray(frame)
    if frame.shape[0] * frame.shape[1] <= LOSSLESS_MAX_PIXELS:
        image.save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue(), "image/png"
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), "image/jpeg"


def latent_pixel_frames(
    start_frame: int, num_frames: int, first_pixel: int, num_pixels: int, temporal_factor: int
) -> list[int]:
    """The pixel frame that shows each latent frame of a chunk: the last video frame it completes.

    The chunk's latent frames ``start_frame .. start_frame + num_frames - 1`` decoded to video
    frames ``first_pixel .. first_pixel + num_pixels - 1``; each latent frame completes
    ``temporal_factor`` frames, and the chunk's last one its last frame (a causal VAE's first
    latent frame completes only one, which this rule also gives). Clamped to the chunk's frames.
    """
    last = first_pixel + num_pixels - 1
    return [max(first_pixel, last - (num_frames - 1 - i) * temporal_factor)
            for i in range(num_frames)]


def memory_of(chunk: StreamedChunk, config: MemFlowConfig) -> dict[str, Any]:
    """The chunk's memory for the page (video 0): ``sink`` (the sink frames generated before it),
    and per layer (keys are layer indices as strings, JSON's) ``bank`` (the frames the bank held)
    and ``activated`` (the sink and bank frames SMA activated in the chunk's last pass, over all
    heads; absent without SMA)."""
    memory = chunk.memory
    start = chunk.plan.start
    if memory is None:
        bank, activated = {}, {}
    else:
        bank = {str(layer): frames[0] for layer, frames in memory.bank.items()}
        activated = {
            str(layer): sorted({frame for head in passes[-1].frames[0] for frame in head})
            for layer, passes in memory.activated.items() if passes
        }
    return {"sink": list(range(min(config.sink_frames, start))), "bank": bank,
            "activated": activated}


def chunk_message(
    chunk: StreamedChunk,
    config: MemFlowConfig,
    first_pixel: int,
    temporal_factor: int,
    decoded_at: float,
    mime: str,
) -> dict[str, Any]:
    """The JSON header sent before a chunk's frames (one binary message each, in order).

    Args:
        chunk: as the stream yielded it (``output_type="np"``).
        first_pixel: the index of its first video frame in the video.
        temporal_factor: video frames per latent frame (``latent_pixel_frames``).
        decoded_at: ``time.monotonic()`` when its last frame was decoded (the page's latency
            starts there).
        mime: the frames' image type.
    """
    report = chunk.report
    num_pixels = report.video_frames or 0
    return {
        "type": "chunk",
        "index": report.chunk_index,
        "start_frame": report.start_frame,
        "num_frames": report.num_frames,
        "prompt": report.prompt,
        "recached": report.recached,
        "seconds": report.seconds,
        "decode_seconds": report.decode_seconds,
        "cache_bytes": report.cache_bytes,
        "first_pixel": first_pixel,
        "num_pixels": num_pixels,
        "latent_pixels": latent_pixel_frames(report.start_frame, report.num_frames, first_pixel,
                                             num_pixels, temporal_factor),
        "decoded_at": decoded_at,
        "mime": mime,
        "memory": memory_of(chunk, config),
    }
