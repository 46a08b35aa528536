"""What the memory held and what SMA activated, per chunk and layer, as plain data.

Recording keeps small device tensors (no host synchronisation in the attention hot path); they
become Python lists only when ``MemoryTrace.chunks()`` is called.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PassActivation:
    """Memory frames one pass of one layer attended to under SMA.

    ``frames[b][h]`` lists the absolute latent-frame indices (ascending) that head ``h`` of batch
    element ``b`` activated among the sink and bank frames.
    """

    kind: str
    frames: list[list[list[int]]]


@dataclass(frozen=True)
class ChunkMemory:
    """The memory of one chunk.

    Attributes:
        chunk_index: position of the chunk in the video.
        start_frame: its first absolute latent frame.
        bank: ``bank[layer][b]``: absolute frames the bank held while the chunk was generated
            (after NAM's update at its start), in slot order.
        activated: ``activated[layer]``: one ``PassActivation`` per pass that ran SMA, in order.
    """

    chunk_index: int
    start_frame: int
    bank: dict[int, list[list[int]]]
    activated: dict[int, list[PassActivation]]

    def bank_recall(self, frames: Collection[int], batch: int = 0) -> float:
        """The retrieval score of a bank: the share of layers whose bank held at least one of
        ``frames`` (e.g. an entity's first appearance, at the chunk where it returns) while this
        chunk was generated, for batch element ``batch``; 0 without a bank."""
        if not self.bank:
            return 0.0
        wanted = set(frames)
        held = [bool(wanted.intersection(banks[batch])) for banks in self.bank.values()]
        return sum(held) / len(held)


@dataclass
class _RawChunk:
    chunk_index: int
    start_frame: int
    bank: dict[int, torch.Tensor] = field(default_factory=dict)
    activated: dict[int, list[tuple[str, torch.Tensor]]] = field(default_factory=dict)


class MemoryTrace:
    """Append-only record of the memory of every chunk of one video (of the ``max_chunks`` most
    recent chunks only, when given)."""

    def __init__(self, max_chunks: int | None = None) -> None:
        self._chunks: deque[_RawChunk] = deque(maxlen=max_chunks)

    def start_chunk(self, chunk_index: int, start_frame: int) -> None:
        self._chunks.append(_RawChunk(chunk_index, start_frame))

    def record_bank(self, layer: int, frame_index: torch.Tensor) -> None:
        """``frame_index``: ``[B, filled]`` absolute frames in the bank; copied."""
        self._chunks[-1].bank[layer] = frame_index.detach().clone()

    def record_activation(self, layer: int, kind: str, frame_index: torch.Tensor) -> None:
        """``frame_index``: ``[B, H, k]`` absolute frames SMA activated in one pass."""
        self._chunks[-1].activated.setdefault(layer, []).append((kind, frame_index.detach()))

    def chunks(self) -> list[ChunkMemory]:
        return [_public(raw) for raw in self._chunks]

    def last(self) -> ChunkMemory | None:
        """The latest chunk's record (``None`` before the first chunk)."""
        return _public(self._chunks[-1]) if self._chunks else None


def _public(raw: _RawChunk) -> ChunkMemory:
    return ChunkMemory(
        chunk_index=raw.chunk_index,
        start_frame=raw.start_frame,
        bank={layer: index.tolist() for layer, index in raw.bank.items()},
        activated={
            layer: [PassActivation(kind, index.tolist()) for kind, index in passes]
            for layer, passes in raw.activated.items()
        },
    )
