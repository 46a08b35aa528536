"""Generate the benchmark's videos (resumably), read videos back, score them, and report.

Generation writes, per configuration and prompt group, ``videos/<config>/<group id>.mp4`` and
then ``videos/<config>/<group id>.json`` (the settings it was made with; written last, it marks
the video as finished). A later run skips every video whose marker exists and records the same
settings, and regenerates one whose settings changed. Scoring always reads the mp4 files, so
generated videos and videos made elsewhere (``memflow eval --videos DIR``) are scored the same
way. A video that is missing, unreadable or fails to generate gets a row with its status in the
per-video table and a line on stderr; it is never dropped silently.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import MemFlowConfig
from ..integrations import reference_integration
from .features import (
    DEFAULT_AESTHETIC_CLIP_MODEL,
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    AestheticPredictor,
    ClipFeatures,
    DinoFeatures,
    LinearAestheticPredictor,
    as_uint8_frames,
)
from .metrics import VideoScores, chunk_aligned_starts, score_video_features, segment_ranges
from .prompts import PromptGroup, match_videos
from .report import SEGMENT_SCORES, VIDEO_SCORES, summarize, write_reports

__all__ = [
    "VIDEO_EXTENSIONS",
    "EvalProtocol",
    "EvalResult",
    "VideoEntry",
    "VideoReadError",
    "VideoScorer",
    "collect_videos",
    "evaluate",
    "generate_videos",
    "iter_video_batches",
    "score_entry",
    "video_paths",
]

_REFERENCE = reference_integration()

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".gif")
_PARTIAL = ".partial"

#: Statuses of a video row.
OK, MISSING, UNREADABLE, UNMATCHED, GENERATION_FAILED, ERROR = (
    "ok",
    "missing",
    "unreadable",
    "unmatched",
    "generation_failed",
    "error",
)


@dataclass(frozen=True)
class EvalProtocol:
    """The benchmark's video geometry. Defaults are the public protocol: a prompt every 40 latent
    frames (10 s at 16 fps after the reference VAE's 4x temporal decoding), 6 prompts -> 240
    latent frames, at the reference family's video size (``Integration.default_video``).

    Attributes:
        frames_per_prompt: latent frames per prompt.
        num_latent_frames: video length in latent frames; ``None``: ``prompts * frames_per_prompt``.
        frames_per_chunk: the generator's chunk size for videos of unknown origin (the reference
            and LongLive: 3); a switch takes effect at the first chunk boundary at or after it.
            Generated videos use their configuration's chunk size.
        temporal_compression: decoded frames per latent frame after the first (the reference
            family's ``vae_temporal_factor``).
        boundary_frames: ``w`` of the cross-segment boundary similarity (16 = 1 s at 16 fps).
    """

    frames_per_prompt: int = 40
    num_latent_frames: int | None = None
    frames_per_chunk: int = 3
    temporal_compression: int = _REFERENCE.vae_temporal_factor
    height: int = _REFERENCE.default_video.height
    width: int = _REFERENCE.default_video.width
    fps: int = 16
    seed: int = 0
    max_sequence_length: int = _REFERENCE.default_video.max_sequence_length
    boundary_frames: int = 16

    def latent_frames(self, num_prompts: int) -> int:
        return self.num_latent_frames or num_prompts * self.frames_per_prompt

    def latent_starts(self, num_prompts: int, frames_per_chunk: int | None = None) -> list[int]:
        """Chunk-aligned first latent frame of each segment (``chunk_aligned_starts``)."""
        return chunk_aligned_starts(
            num_prompts,
            self.frames_per_prompt,
            self.latent_frames(num_prompts),
            frames_per_chunk or self.frames_per_chunk,
        )

    def check(self, groups: Sequence[PromptGroup], frames_per_chunk: int | None = None) -> None:
        """Raise ``ValueError`` when some group's prompts would not all be shown."""
        for group in groups:
            try:
                self.latent_starts(len(group.prompts), frames_per_chunk)
            except ValueError as error:
                raise ValueError(f"group {group.id!r}: {error}") from error


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


@dataclass
class EvalResult:
    """The tables of one evaluation and the files they were written to."""

    video_rows: list[dict[str, Any]]
    segment_rows: list[dict[str, Any]]
    summary_rows: list[dict[str, Any]]
    aesthetic: bool
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [row for row in self.video_rows if row["status"] != OK]


# -------------------------------------------------------------------------------- reading
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
        and not path.stem.endswith(_PARTIAL)
    )


# -------------------------------------------------------------------------------- scoring
class VideoScorer:
    """Extracts per-frame features and computes the metrics; loads its models on first use.

    Args:
        clip: a CLIP Hub id / folder, or a ready :class:`ClipFeatures`.
        dino: a DINO Hub id / folder, or a ready :class:`DinoFeatures`.
        aesthetic: ``None`` (aesthetic quality is reported as absent), a LAION aesthetic-head
            state-dict file (scored on ``aesthetic_clip``'s embeddings), or a predictor.
        aesthetic_clip: the CLIP model of an aesthetic head file (the heads are ViT-L/14's).
        device: where the models run (default: CUDA when available).
        batch_size: frames per forward pass.
    """

    def __init__(
        self,
        clip: str | os.PathLike[str] | ClipFeatures = DEFAULT_CLIP_MODEL,
        dino: str | os.PathLike[str] | DinoFeatures = DEFAULT_DINO_MODEL,
        aesthetic: str | os.PathLike[str] | AestheticPredictor | None = None,
        aesthetic_clip: str | os.PathLike[str] = DEFAULT_AESTHETIC_CLIP_MODEL,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ) -> None:
        self._clip, self._dino, self._aesthetic = clip, dino, aesthetic
        self.aesthetic_clip = aesthetic_clip
        self.device = device
        self.batch_size = batch_size
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def has_aesthetic(self) -> bool:
        return self._aesthetic is not None

    @property
    def loaded(self) -> bool:
        return isinstance(self._clip, ClipFeatures) and isinstance(self._dino, DinoFeatures) and (
            self._aesthetic is None or callable(self._aesthetic)
        )

    def load(self) -> VideoScorer:
        """Load whatever was given by name (no-op once loaded)."""
        if not isinstance(self._clip, ClipFeatures):
            self._clip = ClipFeatures.from_pretrained(self._clip, self.device, self.batch_size)
        if not isinstance(self._dino, DinoFeatures):
            self._dino = DinoFeatures.from_pretrained(self._dino, self.device, self.batch_size)
        if self._aesthetic is not None and not callable(self._aesthetic):
            self._aesthetic = LinearAestheticPredictor.from_files(
                self._aesthetic, self.aesthetic_clip, self.device, self.batch_size
            )
        return self

    @property
    def clip(self) -> ClipFeatures:
        return self.load()._clip  # type: ignore[return-value]

    @property
    def dino(self) -> DinoFeatures:
        return self.load()._dino  # type: ignore[return-value]

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[n, D]`` CLIP text embeddings, each prompt encoded once per scorer."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            for prompt, row in zip(missing, self.clip.encode_texts(missing), strict=True):
                self._text_cache[prompt] = row
        return torch.stack([self._text_cache[p] for p in prompts])

    def frame_features(
        self, batches: Iterator[np.ndarray] | Sequence[np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-frame (DINO, CLIP image, aesthetic or ``None``) features of frame batches."""
        self.load()
        dino, clip, aesthetic = [], [], []
        for batch in batches:
            batch = as_uint8_frames(batch)
            dino.append(self.dino.encode_images(batch))
            clip.append(self.clip.encode_images(batch))
            if self._aesthetic is not None:
                aesthetic.append(torch.as_tensor(self._aesthetic(batch)).double().reshape(-1))
        if not dino:
            raise VideoReadError("no frames")
        return torch.cat(dino), torch.cat(clip), torch.cat(aesthetic) if aesthetic else None

    def score_frames(
        self,
        batches: Iterator[np.ndarray] | Sequence[np.ndarray],
        prompts: Sequence[str],
        latent_starts: Sequence[int],
        num_latent_frames: int,
        temporal_compression: int,
        boundary_frames: int = 16,
    ) -> VideoScores:
        """Scores of one video given as frame batches (``[B, H, W, 3]``, uint8 or [0, 1]) whose
        decoder made ``temporal_compression`` frames per latent frame after the first."""
        dino, clip, aesthetic = self.frame_features(batches)
        ranges = segment_ranges(len(dino), latent_starts, num_latent_frames, temporal_compression)
        empty = [k for k, r in enumerate(ranges) if len(r) == 0]
        if empty:
            raise ValueError(
                f"{len(dino)} frames are too few for {len(ranges)} segments "
                f"(segments {empty} would be empty)"
            )
        return score_video_features(
            dino, clip, self.text_features(prompts), ranges, boundary_frames, aesthetic
        )


# ----------------------------------------------------------------------------- generation
_MARKER_KEYS = (
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


def _video_file(output_dir: Path, config: str, group: PromptGroup) -> Path:
    return output_dir / "videos" / config / f"{group.id}.mp4"


def _settings(
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


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_name(path.stem + _PARTIAL + path.suffix)
    partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def generate_videos(
    groups: Sequence[PromptGroup],
    config_names: Sequence[str],
    output_dir: str | os.PathLike[str],
    protocol: EvalProtocol,
    pipe_factory: Callable[[], Any],
    model: str,
    device: str | torch.device | None = None,
    progress: bool = True,
    log: TextIO | None = None,
) -> list[VideoEntry]:
    """Generate every (configuration, group) video not already finished; return the entries.

    Args:
        pipe_factory: builds the diffusers pipeline (called once, and only when some video is
            to be generated); each configuration attaches its memory to the same pipeline.
        model: recorded in the markers (a changed model regenerates the videos).
        device: where to generate (default: CUDA when available).
    """
    from ..hooks import get_memflow, remove_memflow
    from ..pipeline import MemFlowStreamingPipeline

    log = log or sys.stderr
    output_dir = Path(output_dir)
    entries: list[VideoEntry] = []
    pending: list[tuple[VideoEntry, dict[str, Any]]] = []
    for config_name in config_names:
        frames_per_chunk = MemFlowConfig.preset(config_name).frames_per_chunk
        protocol.check(groups, frames_per_chunk)
        for group in groups:
            path = _video_file(output_dir, config_name, group)
            settings = _settings(group, config_name, model, protocol)
            entry = VideoEntry(
                config_name,
                group.id,
                group,
                path,
                frames_per_chunk=frames_per_chunk,
                num_latent_frames=settings["num_latent_frames"],
                frames_per_prompt=protocol.frames_per_prompt,
            )
            entries.append(entry)
            marker = _read_marker(path)
            done = path.is_file() and marker is not None and marker.get("complete") is True
            if done and all(marker.get(key) == settings[key] for key in _MARKER_KEYS):
                continue
            if done:
                print(
                    f"memflow eval: {config_name}/{group.id}: settings changed, regenerating",
                    file=log,
                )
            pending.append((entry, settings))
    skipped = len(entries) - len(pending)
    if skipped:
        print(f"memflow eval: {skipped} finished video(s) skipped (resume)", file=log)
    if not pending:
        return entries

    pipe = pipe_factory()
    bar = tqdm(total=len(pending), desc="memflow eval: generating", disable=not progress)
    streaming = None
    try:
        for config_name in config_names:
            jobs = [(e, s) for e, s in pending if e.config == config_name]
            if not jobs:
                continue
            if get_memflow(pipe.transformer) is not None:
                remove_memflow(pipe.transformer)
            streaming = MemFlowStreamingPipeline(
                pipe, MemFlowConfig.preset(config_name), device=device
            )
            for entry, settings in jobs:
                bar.set_postfix_str(f"{config_name}/{entry.video}")
                try:
                    _generate_one(streaming, entry, settings)
                except Exception as error:  # one failure (e.g. out of memory) spares the rest
                    entry.status = GENERATION_FAILED
                    entry.message = f"{type(error).__name__}: {error}"
                    print(f"memflow eval: {config_name}/{entry.video}: generation failed: "
                          f"{entry.message}", file=log)
                bar.update(1)
    finally:
        bar.close()
        if streaming is not None and get_memflow(pipe.transformer) is not None:
            remove_memflow(pipe.transformer)
        del pipe, streaming
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the scoring models come next
    return entries


def _generate_one(streaming: Any, entry: VideoEntry, settings: dict[str, Any]) -> None:
    from ..pipeline import PromptSchedule

    assert entry.path is not None and entry.group is not None
    entry.path.parent.mkdir(parents=True, exist_ok=True)
    entry.path.with_suffix(".json").unlink(missing_ok=True)
    began = time.perf_counter()
    generator = torch.Generator(device=streaming.device).manual_seed(settings["seed"])
    result = streaming(
        PromptSchedule.from_prompts(entry.group.prompts, settings["frames_per_prompt"]),
        num_latent_frames=settings["num_latent_frames"],
        height=settings["height"],
        width=settings["width"],
        generator=generator,
        max_sequence_length=settings["max_sequence_length"],
        progress=False,
    )
    partial = entry.path.with_name(entry.path.stem + _PARTIAL + entry.path.suffix)
    result.save_video(partial, fps=settings["fps"])
    os.replace(partial, entry.path)
    seconds = [chunk.seconds for chunk in result.chunks]
    _write_json(
        entry.path.with_suffix(".json"),
        {
            **settings,
            "num_frames": int(result.frames.shape[1]),
            "seconds": round(time.perf_counter() - began, 3),
            "mean_chunk_seconds": round(sum(seconds) / len(seconds), 4),
            "complete": True,
        },
    )


# ---------------------------------------------------------------------------- --videos DIR
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
            marker = _read_marker(path) or {}
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


# ------------------------------------------------------------------------------ evaluation
def score_entry(
    entry: VideoEntry, scorer: VideoScorer, protocol: EvalProtocol
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The per-video row and the per-segment rows of one entry (status set on failure)."""
    row: dict[str, Any] = {
        "config": entry.config,
        "group": entry.group.id if entry.group else "",
        "video": entry.video,
        "status": entry.status,
        "message": entry.message,
        "num_frames": None,
        "num_segments": len(entry.group.prompts) if entry.group else None,
        **{name: None for name in VIDEO_SCORES},
        "path": str(entry.path) if entry.path else "",
    }
    if entry.status != "pending":
        return row, []
    assert entry.group is not None and entry.path is not None
    scorer.load()  # a model that cannot load stops the run; it is not a per-video failure
    local = replace(
        protocol,
        frames_per_prompt=entry.frames_per_prompt or protocol.frames_per_prompt,
        num_latent_frames=entry.num_latent_frames or protocol.num_latent_frames,
    )
    prompts = entry.group.prompts
    try:
        starts = local.latent_starts(len(prompts), entry.frames_per_chunk)
        scores = scorer.score_frames(
            iter_video_batches(entry.path, scorer.batch_size),
            prompts,
            starts,
            local.latent_frames(len(prompts)),
            local.temporal_compression,
            local.boundary_frames,
        )
    except VideoReadError as error:
        row.update(status=MISSING if not entry.path.is_file() else UNREADABLE, message=str(error))
        return row, []
    except Exception as error:  # e.g. too few frames for the segments, out of memory
        row.update(status=ERROR, message=f"{type(error).__name__}: {error}")
        return row, []
    row.update(status=OK, num_frames=scores.segments[-1].frames.stop)
    row.update({name: getattr(scores, name) for name in VIDEO_SCORES})
    segments = []
    for segment in scores.segments:
        segments.append(
            {
                "config": entry.config,
                "group": entry.group.id,
                "video": entry.video,
                "segment": segment.segment + 1,
                "prompt": prompts[segment.segment],
                "start_frame": segment.frames.start,
                "end_frame": segment.frames.stop,
                "num_frames": len(segment.frames),
                **{name: getattr(segment, name) for name in SEGMENT_SCORES},
            }
        )
    return row, segments


def evaluate(
    entries: Sequence[VideoEntry],
    scorer: VideoScorer,
    protocol: EvalProtocol,
    output_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: TextIO | None = None,
) -> EvalResult:
    """Score ``entries``, report failures on ``log`` (stderr), and write the reports into
    ``output_dir`` (``videos.csv``, ``segments.csv``, ``summary.csv``, ``summary.md``,
    ``segment_scores.png``) when given."""
    log = log or sys.stderr
    video_rows, segment_rows = [], []
    for entry in tqdm(entries, desc="memflow eval: scoring", disable=not progress):
        row, segments = score_entry(entry, scorer, protocol)
        if row["status"] != OK:
            print(
                f"memflow eval: {row['config']}/{row['video']}: {row['status']}: {row['message']}",
                file=log,
            )
        video_rows.append(row)
        segment_rows.extend(segments)
    summary = summarize(video_rows, segment_rows)
    result = EvalResult(video_rows, segment_rows, summary, scorer.has_aesthetic)
    if output_dir is not None:
        result.files = write_reports(result, output_dir)
    failed = len(result.failed)
    if failed:
        print(f"memflow eval: {failed} of {len(video_rows)} video(s) not scored (see the status "
              f"column of videos.csv)", file=log)
    return result
