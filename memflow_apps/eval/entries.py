"""The videos of a run: one ``VideoEntry`` per (configuration, prompt group) with its status, and
those of a folder of videos made elsewhere (``collect_videos``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memflow_apps.shared.prompts import PromptGroup, match_videos
from memflow_apps.shared.videos import VIDEO_EXTENSIONS, video_paths

from .markers import read_marker

__all__ = [
    "ERROR",
    "GENERATION_FAILED",
    "MISSING",
    "OK",
    "UNMATCHED",
    "UNREADABLE",
    "VideoEntry",
    "collect_videos",
]

#: Statuses of a video row.
OK, MISSING, UNREADABLE, UNMATCHED, GENERATION_FAILED, ERROR = (
    "ok",
    "missing",
    "unreadable",
    "unmatched",
    "generation_failed",
    "error",
)


@dataclass
class VideoEntry:
    """One video to score (or to report as absent).

    ``frames_per_chunk`` / ``num_latent_frames`` / ``frames_per_prompt`` override the protocol for
    this video (read from the generation marker when there is one)."""

    config: str
    video: str
    group: PromptGroup | None
    path: Path | None
    status: str = "pending"
    message: str = ""
    frames_per_chunk: int | None = None
    num_latent_frames: int | None = None
    frames_per_prompt: int | None = None


def collect_videos(
    videos_dir: str | os.PathLike[str],
    groups: Sequence[PromptGroup],
    id_pattern: str | None = None,
    label: str | None = None,
) -> list[VideoEntry]:
    """Entries for the videos in ``videos_dir`` matched to ``groups`` by file name.

    Video files directly inside ``videos_dir`` form one configuration (named ``label``, default
    the folder's name); each sub-folder holding videos forms one configuration named after it
    (so ``memflow eval``'s own ``videos/`` folder scores as it was generated). Per configuration,
    a group without a video gets a ``missing`` entry and a file matching no group an
    ``unmatched`` entry. A generation marker next to a video (``<stem>.json``) supplies its
    latent frames, frames per prompt and chunk size.

    Raises:
        FileNotFoundError: ``videos_dir`` is not a folder or holds no videos.
    """
    videos_dir = Path(videos_dir)
    if not videos_dir.is_dir():
        raise FileNotFoundError(f"no such folder: {videos_dir}")
    folders = [(label or videos_dir.resolve().name, videos_dir)] + [
        (sub.name, sub) for sub in sorted(videos_dir.iterdir()) if sub.is_dir()
    ]
    entries: list[VideoEntry] = []
    for config, folder in folders:
        paths = video_paths(folder)
        if not paths:
            continue
        matches, unmatched = match_videos(groups, paths, id_pattern)
        for path, group in matches:
            marker = read_marker(path) or {}
            entries.append(
                VideoEntry(
                    config,
                    path.stem,
                    group,
                    path,
                    frames_per_chunk=_positive_int(marker.get("frames_per_chunk")),
                    num_latent_frames=_positive_int(marker.get("num_latent_frames")),
                    frames_per_prompt=_positive_int(marker.get("frames_per_prompt")),
                )
            )
        found = {group.id for _, group in matches}
        for group in groups:
            if group.id not in found:
                entries.append(
                    VideoEntry(config, group.id, group, None, MISSING, f"no video for group "
                               f"{group.id!r} in {folder}")
                )
        for path in unmatched:
            entries.append(
                VideoEntry(config, path.stem, None, path, UNMATCHED,
                           f"{path.name} matches no prompt group (see --id-pattern)")
            )
    if not entries:
        raise FileNotFoundError(
            f"no video files ({', '.join(VIDEO_EXTENSIONS)}) in {videos_dir} or its sub-folders"
        )
    return entries


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
