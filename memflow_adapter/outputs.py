"""Writing a generation's artefacts: the video, the memory timeline and a JSON report."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

from .config import MemFlowConfig
from .stream import StreamingVideoOutput
from .timeline import draw_memory_timeline


def peak_process_memory_bytes() -> int:
    """Peak resident memory of this process so far (``ru_maxrss``: KiB on Linux, B on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_report(result: StreamingVideoOutput, layer: int = 0) -> list[dict[str, Any]]:
    """Per chunk: prompt, latency, cache size, and which past frames the memory held (bank) and
    SMA activated (context pass), for ``layer`` and the first video."""
    rows = []
    for report, chunk in zip(result.chunks, result.trace, strict=True):
        activated = chunk.activated.get(layer, [])
        rows.append(
            {
                "chunk": report.chunk_index,
                "start_frame": report.start_frame,
                "prompt": report.prompt,
                "recached": report.recached,
                "seconds": round(report.seconds, 4),
                "cache_bytes": report.cache_bytes,
                "bank_frames": chunk.bank.get(layer, [[]])[0],
                "sma_activated_frames": (
                    sorted({f for head in activated[-1].frames[0] for f in head})
                    if activated
                    else None
                ),
            }
        )
    return rows


def write_outputs(
    result: StreamingVideoOutput,
    config: MemFlowConfig,
    output_dir: str | Path,
    fps: int,
    extra: dict[str, Any],
    video: Path | None = None,
) -> dict[str, Path]:
    """Save ``video.mp4`` (unless ``video`` names the file the frames were already written
    to), ``memory_timeline.png`` and ``report.json`` into ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "video": video or result.save_video(output_dir / "video.mp4", fps=fps),
        "timeline": draw_memory_timeline(
            result.trace, config, output_dir / "memory_timeline.png",
            prompt_switches=[chunk.chunk_index for chunk in result.chunks if chunk.recached],
        ),
        "report": output_dir / "report.json",
    }
    seconds = [chunk.seconds for chunk in result.chunks]
    report = {
        **extra,
        "config": config.to_dict(),
        "num_chunks": len(result.chunks),
        "mean_chunk_seconds": sum(seconds) / len(seconds),
        "seconds_to_first_frame": result.seconds_to_first_frame,
        "denoise_fps": result.denoise_fps,
        "end_to_end_fps": result.end_to_end_fps,
        "hardware": result.hardware,
        "peak_cuda_memory_bytes": result.peak_memory_bytes,
        "peak_process_memory_bytes": peak_process_memory_bytes(),
        "chunks": memory_report(result),
        "files": {name: str(path) for name, path in paths.items()},
    }
    paths["report"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return paths
