"""memflow-adapter: long-term narrative memory for streaming, KV-cached video diffusion models.

After MemFlow (arXiv 2512.14699): a per-layer streaming KV cache with a sink, a memory bank
refreshed by Narrative Adaptive Memory (NAM), and a local window; optional Sparse Memory
Activation (SMA) inside self-attention.
"""

from .config import MemFlowConfig
from .hooks import MemFlowAttachment, apply_memflow, get_memflow, remove_memflow
from .hub import MemFlowAdapter, PublishedLayout
from .introspection import ChunkMemory, PassActivation
from .pipeline import MemFlowStreamingPipeline, PromptSchedule, StreamingVideoOutput
from .session import PassKind, RecacheWindow, SessionStateError, StreamingSession
from .version import __version__

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
