"""A picture of what the streaming memory held, chunk by chunk, drawn from a session's trace."""

from __future__ import annotations

import os
import pathlib
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .config import MemFlowConfig
from .extras import import_optional
from .introspection import ChunkMemory

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes
    from matplotlib.container import BarContainer
    from matplotlib.lines import Line2D

_PURPOSE = "drawing the memory timeline"

_OWN, _SINK, _WINDOW = "#f28e2b", "#4e79a7", "#a9cce3"
_BANK, _ACTIVATED, _SWITCH = "#1b1b1b", "#d62728", "#59a14f"
_ACTIVATED_AREA = 240.0  # marker area (points^2) of a frame that every head activated


def draw_memory_timeline(
    trace: Sequence[ChunkMemory],
    config: MemFlowConfig,
    path: str | os.PathLike[str],
    layer: int = 0,
    batch_index: int = 0,
    title: str | None = None,
    prompt_switches: Sequence[int] = (),
) -> pathlib.Path:
    """Draw, as a PNG, which latent frames each chunk's memory held: one column per chunk.

    The x axis is the chunk index, the y axis the absolute latent frame index (0 at the bottom).
    Each column shows, as bars, the chunk's own frames, the sink frames generated before it and
    the past frames of its local window (the ``config.window_capacity`` most recent non-sink
    frames; every past non-sink frame when the window is unbounded); as square markers, the frames
    in the memory bank of ``layer`` for batch element ``batch_index``; and, when the trace holds
    SMA activations for that layer, rings on the sink/bank frames activated in the chunk's last
    pass, each ring's area proportional to the fraction of heads that activated the frame.

    Args:
        trace: ``StreamingSession.trace()``.
        config: the configuration the trace was recorded with.
        path: where the PNG goes; missing parent folders are created.
        layer: the self-attention layer whose bank and activations are drawn.
        batch_index: the batch element whose bank and activations are drawn.
        title: the figure title; default ``"MemFlow memory, layer {layer}"``.
        prompt_switches: indices of the chunks that opened a new prompt (and recached), marked
            by a dashed line before their column.

    Returns:
        ``path`` as a ``pathlib.Path``.

    Raises:
        ValueError: ``trace`` is empty; ``layer`` has no bank data in a trace of several chunks
            recorded with a bank; ``batch_index`` is outside the recorded batch.
    """
    _check_arguments(trace, config, layer, batch_index)
    Figure = import_optional("matplotlib.figure", "video", _PURPOSE).Figure
    FigureCanvasAgg = import_optional(
        "matplotlib.backends.backend_agg", "video", _PURPOSE
    ).FigureCanvasAgg
    MaxNLocator = import_optional("matplotlib.ticker", "video", _PURPOSE).MaxNLocator
    figure = Figure(figsize=_figure_size(trace, config), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    handles = [
        *_draw_regions(axes, trace, config),
        *_draw_bank(axes, trace, layer, batch_index),
        *_draw_activations(axes, trace, layer, batch_index),
        *_draw_switches(axes, prompt_switches),
    ]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.set_title(title if title is not None else f"MemFlow memory, layer {layer}")
    axes.set_xlabel("chunk index")
    axes.set_ylabel("absolute latent frame index")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylim(-0.5, trace[-1].start_frame + config.frames_per_chunk - 0.5)
    axes.grid(axis="y", color="#dddddd", linewidth=0.6)
    axes.set_axisbelow(True)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path


def _check_arguments(
    trace: Sequence[ChunkMemory], config: MemFlowConfig, layer: int, batch_index: int
) -> None:
    if len(trace) == 0:
        raise ValueError("trace must hold at least one chunk, got an empty trace")
    layers = sorted({index for chunk in trace for index in chunk.bank})
    if len(trace) > 1 and config.bank_frames > 0 and layer not in layers:
        raise ValueError(f"layer must be one of the trace's bank layers {layers}, got {layer}")
    batch = _batch_size(trace, layer)
    if batch_index < 0 or (batch is not None and batch_index >= batch):
        expected = ">= 0" if batch is None else f"in 0..{batch - 1}"
        raise ValueError(f"batch_index must be {expected}, got {batch_index}")


def _batch_size(trace: Sequence[ChunkMemory], layer: int) -> int | None:
    """The batch size the trace records for ``layer``; ``None`` when it records nothing."""
    for chunk in trace:
        if layer in chunk.bank:
            return len(chunk.bank[layer])
        if chunk.activated.get(layer):
            return len(chunk.activated[layer][-1].frames)
    return None


def _figure_size(trace: Sequence[ChunkMemory], config: MemFlowConfig) -> tuple[float, float]:
    frames = trace[-1].start_frame + config.frames_per_chunk
    width = min(max(8.0, 4.5 + 0.4 * len(trace)), 30.0)
    height = min(max(4.5, 1.5 + 0.2 * frames), 20.0)
    return width, height


def _window_start(start_frame: int, config: MemFlowConfig) -> int:
    """The oldest past frame in the local window of a chunk that starts at ``start_frame``."""
    capacity = config.window_capacity
    oldest = 0 if capacity is None else start_frame - capacity
    return max(oldest, config.sink_frames)


def _draw_regions(
    axes: Axes, trace: Sequence[ChunkMemory], config: MemFlowConfig
) -> list[BarContainer]:
    """Per chunk, one bar for each region: its own frames, the sink, the local window.

    A region that is empty in every chunk is left out (and so is its legend entry); returns the
    legend handles.
    """
    columns = [chunk.chunk_index for chunk in trace]
    starts = [chunk.start_frame for chunk in trace]
    windows = [_window_start(start, config) for start in starts]
    window_sizes = [max(start - window, 0) for start, window in zip(starts, windows, strict=True)]
    regions = (
        ("chunk's own frames", _OWN, starts, [config.frames_per_chunk] * len(starts)),
        ("sink frames", _SINK, [0] * len(starts), [min(config.sink_frames, s) for s in starts]),
        ("local window (past)", _WINDOW, windows, window_sizes),
    )
    return [
        axes.bar(
            columns,
            heights,
            bottom=[bottom - 0.5 for bottom in bottoms],
            width=0.8,
            color=colour,
            edgecolor="white",
            linewidth=0.5,
            label=label,
        )
        for label, colour, bottoms, heights in regions
        if any(heights)
    ]


def _draw_bank(
    axes: Axes, trace: Sequence[ChunkMemory], layer: int, batch_index: int
) -> list[Artist]:
    """Square markers on the bank frames of each chunk; returns legend handles."""
    points = [
        (chunk.chunk_index, frame)
        for chunk in trace
        if layer in chunk.bank
        for frame in chunk.bank[layer][batch_index]
    ]
    if not points:
        return []
    columns, frames = zip(*points, strict=True)
    return [
        axes.scatter(
            columns,
            frames,
            s=44,
            marker="s",
            color=_BANK,
            edgecolors="white",
            linewidths=0.6,
            zorder=3,
            label="memory bank frame",
        )
    ]


def _draw_activations(
    axes: Axes, trace: Sequence[ChunkMemory], layer: int, batch_index: int
) -> list[Artist]:
    """Rings on the frames SMA activated in each chunk's last pass; returns legend handles."""
    columns, frames, areas, num_heads = [], [], [], 0
    for chunk in trace:
        passes = chunk.activated.get(layer)
        if not passes:
            continue
        heads = passes[-1].frames[batch_index]
        num_heads = len(heads)
        for frame, count in sorted(Counter(f for head in heads for f in head).items()):
            columns.append(chunk.chunk_index)
            frames.append(frame)
            areas.append(_ACTIVATED_AREA * count / num_heads)
    if not columns:
        return []
    axes.scatter(
        columns, frames, s=areas, facecolors="none", edgecolors=_ACTIVATED, linewidths=1.5, zorder=4
    )
    return [_ring_handle(share, num_heads) for share in sorted({1, num_heads})]


def _draw_switches(axes: Axes, prompt_switches: Sequence[int]) -> list[Artist]:
    """A dashed line before each chunk that opened a new prompt; returns legend handles."""
    lines = [
        axes.axvline(chunk - 0.5, color=_SWITCH, linestyle="--", linewidth=1.2, zorder=2)
        for chunk in prompt_switches
    ]
    if lines:
        lines[0].set_label("prompt switch (recache)")
    return lines[:1]


def _ring_handle(share: int, num_heads: int) -> Line2D:
    """A legend entry for a ring of a frame activated by ``share`` of ``num_heads`` heads."""
    Line2D = import_optional("matplotlib.lines", "video", _PURPOSE).Line2D
    return Line2D(
        [],
        [],
        linestyle="none",
        marker="o",
        markersize=(_ACTIVATED_AREA * share / num_heads) ** 0.5,
        markerfacecolor="none",
        markeredgecolor=_ACTIVATED,
        markeredgewidth=1.5,
        label=f"SMA-activated (last pass), {share}/{num_heads} heads",
    )
