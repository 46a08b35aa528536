"""The passes of a chunk and what each fixes when it starts (architecture s.2d, s.4b)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class PassKind(str, Enum):
    DENOISE = "denoise"
    CONTEXT = "context"
    RECACHE = "recache"


@dataclass(frozen=True)
class PassPlan:
    """What every layer's ``attend`` does in the running pass, fixed when the pass starts.

    Only values that stop changing once the cache is full are here (never an absolute frame),
    so the plans of two chunks in a full cache are equal, and so are the guards of a compiled
    model that reads them.

    Attributes:
        kind: the pass.
        cached: some frame is cached (every pass but those of the first chunk).
        own_in_slot: the pass's own K/V go to the caches' pass slots (unquantized, allocated),
            where a context pass's commit reads them; otherwise a context pass holds them
            until it ends.
        recache_frames: frames of a recache pass (0 for the other passes).
        protect_sink: a recache keeps the sink's keys.
    """

    kind: PassKind
    cached: bool
    own_in_slot: bool
    recache_frames: int = 0
    protect_sink: bool = False


@dataclass(frozen=True)
class RecacheWindow:
    """Frames ``start_frame .. stop_frame - 1`` to re-encode under the new prompt.

    ``protect_sink``: the video is longer than the cache, so the sink keeps its old keys and the
    recached frames that are no longer cached are computed and discarded.
    """

    start_frame: int
    stop_frame: int
    protect_sink: bool

    @property
    def num_frames(self) -> int:
        return self.stop_frame - self.start_frame


class SessionStateError(RuntimeError):
    """A session method was called out of the chunk lifecycle's order."""


def check_pass_frames(
    plan: PassPlan, num_frames: int, frames_per_chunk: int, window: RecacheWindow | None
) -> None:
    """Raise unless a layer's pass holds the frames its plan expects (before anything is
    written): the recache ``window``'s frames, or ``1 .. frames_per_chunk`` frames of a chunk."""
    if plan.recache_frames:
        if num_frames != plan.recache_frames:
            raise ValueError(
                f"the recache pass must cover {plan.recache_frames} frames "
                f"({window.start_frame}..{window.stop_frame - 1}), got {num_frames}"
            )
        return
    if not 1 <= num_frames <= frames_per_chunk:
        raise ValueError(
            f"a chunk pass must hold 1..frames_per_chunk={frames_per_chunk} frames, "
            f"got {num_frames}"
        )


def chunk_frames(pass_frames: list[int], chunk: int | None) -> int | None:
    """The frames of a chunk whose every pass must hold as many: ``chunk`` (those of its earlier
    passes; ``None`` before any) checked against the frames each layer of a finished pass held
    (checked when the pass ends, before its commit)."""
    if not pass_frames:
        return chunk
    expected = pass_frames[0] if chunk is None else chunk
    wrong = [n for n in pass_frames if n != expected]
    if wrong:
        raise ValueError(
            f"every pass of a chunk must hold the same frames: this chunk has {expected}, "
            f"got {wrong[0]}"
        )
    return expected
