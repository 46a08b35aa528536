"""Reports of an evaluation: CSV tables, a markdown summary and a PNG of per-segment scores.

Files written by :func:`write_reports`:

* ``videos.csv``: one row per video, with its ``status`` (``ok``, ``missing``, ``unreadable``,
  ``unmatched``, ``generation_failed``, ``error``) and ``message``; scores are empty unless ok.
* ``segments.csv``: one row per scored video and segment (1-based ``segment``, its prompt and
  decoded-frame range ``[start_frame, end_frame)``).
* ``summary.csv`` / ``summary.md``: one row per configuration: means over its scored videos,
  and the per-segment CLIP scores ``clip_seg1 .. clip_segN``.
* ``segment_scores.png``: per-segment CLIP score, consistency and cross-segment consistency,
  one line per configuration.

All scores are on the x100 scale. Empty cells (CSV) and ``n/a`` (markdown) mean *not measured*:
aesthetic quality without a predictor, the first segment's cross-segment values.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memflow_adapter.extras import import_optional

from .metrics import nanmean

if TYPE_CHECKING:
    from .scoring import EvalResult

__all__ = [
    "SEGMENT_COLUMNS",
    "SEGMENT_SCORES",
    "SUMMARY_SCORES",
    "VIDEO_COLUMNS",
    "VIDEO_SCORES",
    "format_value",
    "markdown_table",
    "plot_segment_scores",
    "summarize",
    "summary_markdown",
    "write_csv",
    "write_reports",
]

#: Video-level scores (``videos.csv``), averaged per configuration in the summary.
VIDEO_SCORES = (
    "clip_score",
    "subject_consistency",
    "background_consistency",
    "consistency",
    "cross_segment_consistency",
    "aesthetic_quality",
)
SUMMARY_SCORES = VIDEO_SCORES
#: Segment-level scores (``segments.csv``).
SEGMENT_SCORES = (
    "clip_score",
    "subject_consistency",
    "background_consistency",
    "consistency",
    "boundary_subject",
    "boundary_background",
    "anchor_subject",
    "anchor_background",
    "cross_segment_consistency",
    "aesthetic_quality",
)
VIDEO_COLUMNS = (
    "config", "group", "video", "status", "message", "num_frames", "num_segments",
    *VIDEO_SCORES, "path",
)
SEGMENT_COLUMNS = (
    "config", "group", "video", "segment", "prompt", "start_frame", "end_frame", "num_frames",
    *SEGMENT_SCORES,
)
_PLOTTED = (
    ("clip_score", "CLIP score"),
    ("consistency", "consistency (subject + background)"),
    ("cross_segment_consistency", "cross-segment consistency"),
)


def _finite(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    )


def format_value(value: Any, digits: int = 4) -> str:
    """A table cell: floats rounded, ``None`` / NaN empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _configs(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(row["config"] for row in rows))


def summarize(
    video_rows: Sequence[dict[str, Any]], segment_rows: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per configuration: counts, mean video-level scores over its scored videos, and
    the mean CLIP score of each segment position (``clip_seg1`` ...)."""
    num_segments = max((row["segment"] for row in segment_rows), default=0)
    summary = []
    for config in _configs(video_rows):
        videos = [row for row in video_rows if row["config"] == config]
        scored = [row for row in videos if row["status"] == "ok"]
        segments = [row for row in segment_rows if row["config"] == config]
        entry: dict[str, Any] = {
            "config": config,
            "videos": len(videos),
            "scored": len(scored),
            "not_scored": len(videos) - len(scored),
        }
        for name in SUMMARY_SCORES:
            values = [row[name] for row in scored if _finite(row[name])]
            entry[name] = nanmean(values) if values else None
        for k in range(1, num_segments + 1):
            entry[f"clip_seg{k}"] = nanmean(
                [row["clip_score"] for row in segments if row["segment"] == k]
            )
        summary.append(entry)
    return summary


def write_csv(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    fieldnames: Sequence[str] | None = None,
) -> Path:
    """Write ``rows`` as CSV (floats rounded to 4 decimals, ``None``/NaN as empty cells)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fieldnames = list(fieldnames or (rows[0].keys() if rows else []))
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: format_value(row.get(key)) for key in fieldnames})
    return path


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int = 2) -> str:
    """A GitHub markdown table; missing values are written ``n/a``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [format_value(row.get(column), digits) or "n/a" for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(result: EvalResult) -> str:
    """The summary table plus notes on absent measures and unscored videos."""
    rows = result.summary_rows
    columns = ["config", "videos", "scored", *SUMMARY_SCORES]
    columns += sorted(
        {key for row in rows for key in row if key.startswith("clip_seg")},
        key=lambda key: int(key.removeprefix("clip_seg")),
    )
    notes = ["All scores x100; means over each configuration's scored videos."]
    if not result.aesthetic:
        notes.append(
            "aesthetic_quality: absent (no aesthetic predictor given; see --aesthetic-head)."
        )
    failed = result.failed
    if failed:
        notes.append(
            f"{len(failed)} video(s) not scored: "
            + ", ".join(f"{r['config']}/{r['video']} ({r['status']})" for r in failed[:10])
            + (" ..." if len(failed) > 10 else "")
        )
    return markdown_table(rows, columns) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"


def plot_segment_scores(
    segment_rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """A PNG of per-segment CLIP score, consistency and cross-segment consistency (means over
    each configuration's videos), one line per configuration and panel."""
    purpose = "plotting segment scores"
    Figure = import_optional("matplotlib.figure", "video", purpose).Figure
    FigureCanvasAgg = import_optional(
        "matplotlib.backends.backend_agg", "video", purpose
    ).FigureCanvasAgg
    MaxNLocator = import_optional("matplotlib.ticker", "video", purpose).MaxNLocator
    figure = Figure(figsize=(13.5, 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, len(_PLOTTED))
    num_segments = max((row["segment"] for row in segment_rows), default=1)
    for axes, (name, label) in zip(panels, _PLOTTED, strict=True):
        for config in _configs(segment_rows):
            points = []
            for k in range(1, num_segments + 1):
                mean = nanmean(
                    [r[name] for r in segment_rows if r["config"] == config and r["segment"] == k]
                )
                if not math.isnan(mean):
                    points.append((k, mean))
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", label=config)
        axes.set_title(label)
        axes.set_xlabel("segment (prompt)")
        axes.set_xlim(0.5, num_segments + 0.5)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(color="#dddddd", linewidth=0.6)
        axes.set_axisbelow(True)
    panels[0].set_ylabel("score (x100)")
    if segment_rows:
        panels[0].legend(loc="best", fontsize="small")
    figure.suptitle(title or "Per-segment scores by configuration")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path


def write_reports(result: EvalResult, output_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write every report file of ``result`` into ``output_dir``; return their paths by name."""
    output_dir = Path(output_dir)
    summary_fields = list(result.summary_rows[0]) if result.summary_rows else ["config"]
    files = {
        "videos": write_csv(result.video_rows, output_dir / "videos.csv", VIDEO_COLUMNS),
        "segments": write_csv(result.segment_rows, output_dir / "segments.csv", SEGMENT_COLUMNS),
        "summary": write_csv(result.summary_rows, output_dir / "summary.csv", summary_fields),
        "summary_markdown": output_dir / "summary.md",
        "plot": plot_segment_scores(result.segment_rows, output_dir / "segment_scores.png"),
    }
    files["summary_markdown"].write_text(summary_markdown(result), encoding="utf-8")
    return files
