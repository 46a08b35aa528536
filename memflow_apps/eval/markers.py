"""The resumable run's bookkeeping: where a generated video goes, the settings it is made with, and
its marker (``<group id>.json`` beside the mp4, written last: the video is finished).

A later run skips every video whose marker records ``complete`` and the same settings
(``MARKER_KEYS``), and regenerates one whose settings changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from memflow_adapter.config import MemFlowConfig
from memflow_apps.shared.prompts import PromptGroup
from memflow_apps.shared.videos import PARTIAL

from .protocol import EvalProtocol

__all__ = ["MARKER_KEYS", "read_marker", "settings_of", "video_file", "write_json"]

#: The settings that must match for a finished video to be kept.
MARKER_KEYS = (
    "prompts",
    "model",
    "config",
    "memflow_config",
    "seed",
    "num_latent_frames",
    "frames_per_prompt",
    "height",
    "width",
    "fps",
    "max_sequence_length",
)


def video_file(output_dir: Path, config: str, group: PromptGroup) -> Path:
    return output_dir / "videos" / config / f"{group.id}.mp4"


def settings_of(
    group: PromptGroup, config_name: str, model: str, protocol: EvalProtocol
) -> dict[str, Any]:
    config = MemFlowConfig.preset(config_name)
    return {
        "group": group.id,
        "prompts": list(group.prompts),
        "model": model,
        "config": config_name,
        "memflow_config": config.to_dict(),
        "seed": protocol.seed + group.index,
        "num_latent_frames": protocol.latent_frames(len(group.prompts)),
        "frames_per_prompt": protocol.frames_per_prompt,
        "frames_per_chunk": config.frames_per_chunk,
        "height": protocol.height,
        "width": protocol.width,
        "fps": protocol.fps,
        "max_sequence_length": protocol.max_sequence_length,
    }


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_name(path.stem + PARTIAL + path.suffix)
    partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)
