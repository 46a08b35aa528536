"""memflow-adapter: long-term narrative memory for streaming, KV-cached video diffusion models.

After MemFlow (arXiv 2512.14699): a per-layer streaming KV cache with a sink, a memory bank
refreshed by Narrative Adaptive Memory (NAM), and a local window; optional Sparse Memory
Activation (SMA) inside self-attention.
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_exports
from .version import __version__

if TYPE_CHECKING:
    from .config import MemFlowConfig
    from .hooks import MemFlowAttachment, apply_memflow, get_memflow, remove_memflow
    from .hub import MemFlowAdapter, PublishedLayout
    from .introspection import ChunkMemory
    from .pipeline import MemFlowStreamingPipeline
    from .schedule import FlowMatchSchedule
    from .session import SessionStateError, StreamingSession
    from .stream import ChunkReport, StreamedChunk, StreamingVideoOutput, VideoStream
    from .streaming import (
        ChunkEngine,
        ChunkPlan,
        Denoised,
        Guidance,
        OpenChunk,
        PromptConditioning,
        PromptSchedule,
    )

# What users construct (configs, the pipeline, schedules, the engine's inputs) and what they get
# back (attachments, streams, chunks, reports, traces); the engine's internals stay in their
# modules. Imported on first use: the CLI builds its parser without torch (memflow --help).
_EXPORTS = {
    "MemFlowConfig": ".config",
    "MemFlowAttachment": ".hooks",
    "apply_memflow": ".hooks",
    "get_memflow": ".hooks",
    "remove_memflow": ".hooks",
    "MemFlowAdapter": ".hub",
    "PublishedLayout": ".hub",
    "ChunkMemory": ".introspection",
    "MemFlowStreamingPipeline": ".pipeline",
    "FlowMatchSchedule": ".schedule",
    "SessionStateError": ".session",
    "StreamingSession": ".session",
    "ChunkReport": ".stream",
    "StreamedChunk": ".stream",
    "StreamingVideoOutput": ".stream",
    "VideoStream": ".stream",
    "ChunkEngine": ".streaming",
    "ChunkPlan": ".streaming",
    "Denoised": ".streaming",
    "Guidance": ".streaming",
    "OpenChunk": ".streaming",
    "PromptConditioning": ".streaming",
    "PromptSchedule": ".streaming",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "ChunkEngine",
    "ChunkMemory",
    "ChunkPlan",
    "ChunkReport",
    "Denoised",
    "FlowMatchSchedule",
    "Guidance",
    "MemFlowAdapter",
    "MemFlowAttachment",
    "MemFlowConfig",
    "MemFlowStreamingPipeline",
    "OpenChunk",
    "PromptConditioning",
    "PromptSchedule",
    "PublishedLayout",
    "SessionStateError",
    "StreamedChunk",
    "StreamingSession",
    "StreamingVideoOutput",
    "VideoStream",
    "__version__",
    "apply_memflow",
    "get_memflow",
    "remove_memflow",
]
