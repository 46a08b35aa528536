"""RoPE positions of a stream longer than the model's position table (architecture s.2b).

Cached keys are stored rotated at their frame's RoPE position. While the video fits in the table,
that position is the absolute latent frame (the reference semantics). Past it the session
*re-bases*: every position moves ``shift`` frames earlier and the cached keys are rotated by
``-shift`` frames (a rotation composes exactly with the stored one). Attention scores between two
frames only see their relative offset, so for the frames that keep their true offset nothing
changes. Memory frames (sink and bank) whose position would fall below 0 take the position
``MemFlowConfig.position_overflow`` says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: ``MemFlowConfig.position_overflow`` values.
POSITION_OVERFLOWS = ("before_window", "clamp")

#: ``rotate(keys, frame_shift) -> keys``: ``keys`` ``[B, n * T_f, H, D]`` (post-RoPE, ``n``
#: frames) rotated as if RoPE had put frame ``i`` ``frame_shift[b, i]`` frames later
#: (``frame_shift``: ``[B, n]`` int64, negative moves earlier).
RotateKeys = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RopeTable:
    """The temporal positions a model's RoPE rotates to: ``0 .. frames - 1``, and how a cached
    key moves between them (the integration's ``rope_frames`` and ``rotate_keys``)."""

    frames: int
    rotate: RotateKeys

    def __post_init__(self) -> None:
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1:
            raise ValueError(f"frames must be an int >= 1, got {self.frames!r}")

    def require_room(self, span: int | None, cache_frames: int, frames_per_chunk: int) -> None:
        """Raise unless the table holds ``span`` positions at once: a layout's recache of
        ``cache_frames`` frames then a chunk (``MemFlowConfig.position_span``; ``None``: an
        unbounded window, re-based never)."""
        if span is not None and span > self.frames:
            raise ValueError(
                f"the model's RoPE table holds {self.frames} latent frames, but this layout "
                f"needs {span} positions at once (a recache of sink_frames + local_frames = "
                f"{cache_frames} frames, then a chunk of frames_per_chunk={frames_per_chunk}): "
                "use a smaller sink_frames or local_frames"
            )


def overflowed_positions(
    positions: torch.Tensor, shift: int, window_position: int, policy: str
) -> torch.Tensor:
    """Memory frames' positions after a re-base by ``shift``.

    Args:
        positions: ``[B, C]`` int64 positions of the sink then bank frames, in temporal order
            (slot order is temporal in both regions).
        shift: how many positions every frame moves earlier (> 0).
        window_position: the position of the oldest window frame after the shift (or of the next
            chunk's first frame when the window is empty).
        policy: ``"clamp"``: a frame whose position would fall below 0 takes 0, the oldest
            representable position. ``"before_window"``: such frames, oldest first, take the
            positions just before the oldest frame that keeps its position (a bank frame or the
            window), as Deep Forcing and infinity-RoPE place their sinks (clamped at 0).

    Returns:
        ``[B, C]`` int64; frames that still fit move by exactly ``shift``.
    """
    if policy not in POSITION_OVERFLOWS:
        raise ValueError(f"policy must be one of {list(POSITION_OVERFLOWS)}, got {policy!r}")
    moved = positions - shift
    overflow = moved < 0
    if policy == "clamp":
        return moved.clamp_min(0)
    anchor = torch.where(overflow, window_position, moved).amin(dim=1, keepdim=True)
    count = overflow.sum(dim=1, keepdim=True)
    rank = overflow.long().cumsum(dim=1) - 1  # order among the overflowing frames
    packed = (anchor - count + rank).clamp_min(0)
    return torch.where(overflow, packed, moved)
