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
    from .introspection import ChunkMemory, PassActivation
    from .pipeline import MemFlowStreamingPipeline, PromptSchedule, StreamingVideoOutput
    from .session import PassKind, RecacheWindow, SessionStateError, StreamingSession

# Imported on first use: the CLI builds its parser without torch (memflow --help).
_EXPORTS = {
    "MemFlowConfig": ".config",
    "MemFlowAttachment": ".hooks",
    "apply_memflow": ".hooks",
    "get_memflow": ".hooks",
    "remove_memflow": ".hooks",
    "MemFlowAdapter": ".hub",
    "PublishedLayout": ".hub",
    "ChunkMemory": ".introspection",
    "PassActivation": ".introspection",
    "MemFlowStreamingPipeline": ".pipeline",
    "PromptSchedule": ".pipeline",
    "StreamingVideoOutput": ".pipeline",
    "PassKind": ".session",
    "RecacheWindow": ".session",
    "SessionStateError": ".session",
    "StreamingSession": ".session",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "ChunkMemory",
    "MemFlowAdapter",
    "MemFlowAttachment",
    "MemFlowConfig",
    "MemFlowStreamingPipeline",
    "PassActivation",
    "PassKind",
    "PromptSchedule",
    "PublishedLayout",
    "RecacheWindow",
    "SessionStateError",
    "StreamingSession",
    "StreamingVideoOutput",
    "__version__",
    "apply_memflow",
    "get_memflow",
    "remove_memflow",
]
