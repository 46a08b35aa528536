"""The multi-prompt long-video benchmark (``memflow eval``).

The public interactive protocol of LongLive / MemFlow: narrative groups of successive prompts
(100 groups of 6), one video per group with a prompt switch every 40 latent frames (240 latent
frames, six 10 s segments at 16 fps). Modules:

* :mod:`.prompts`: prompt-group files (JSONL / JSON / text) and matching video files to groups;
* :mod:`.metrics`: the metrics as pure functions of per-frame features, and segment splitting;
* :mod:`.features`: CLIP / DINO feature extractors and the LAION aesthetic head (transformers);
* :mod:`.protocol`: the videos' geometry and segment starts (``EvalProtocol``);
* :mod:`.videos`: finding and decoding video files;
* :mod:`.entries`: the videos of a run and their statuses, and folders of videos made elsewhere;
* :mod:`.markers`: the resumable run's bookkeeping (settings and finished-video markers);
* :mod:`.generation`: resumable generation;
* :mod:`.scoring`: per-frame features, per-video and per-segment rows, a scored run;
* :mod:`.report`: CSV / markdown / PNG reports;
* :mod:`.cli`: the ``memflow eval`` sub-command (``add_eval_parser``).

The metric definitions are in :mod:`.metrics`' docstring.
"""

from typing import TYPE_CHECKING

from memflow_adapter._lazy import lazy_exports

if TYPE_CHECKING:
    from memflow_apps.shared.prompts import (
        PromptFileError,
        PromptGroup,
        load_prompt_groups,
        match_videos,
    )
    from memflow_apps.shared.videos import VideoReadError, iter_video_batches

    from .entries import VideoEntry, collect_videos
    from .features import ClipFeatures, DinoFeatures, LinearAestheticPredictor
    from .generation import generate_videos
    from .metrics import (
        SegmentScores,
        VideoScores,
        anchor_similarity,
        boundary_similarity,
        chunk_aligned_starts,
        clip_score,
        score_video_features,
        segment_ranges,
        temporal_consistency,
    )
    from .protocol import EvalProtocol
    from .report import plot_segment_scores, summarize, write_reports
    from .scoring import EvalResult, VideoScorer, evaluate

# Imported on first use: the CLI builds its parser without torch (memflow --help).
_EXPORTS = {
    "ClipFeatures": ".features",
    "DinoFeatures": ".features",
    "LinearAestheticPredictor": ".features",
    "SegmentScores": ".metrics",
    "VideoScores": ".metrics",
    "anchor_similarity": ".metrics",
    "boundary_similarity": ".metrics",
    "chunk_aligned_starts": ".metrics",
    "clip_score": ".metrics",
    "score_video_features": ".metrics",
    "segment_ranges": ".metrics",
    "temporal_consistency": ".metrics",
    "PromptFileError": "memflow_apps.shared.prompts",
    "PromptGroup": "memflow_apps.shared.prompts",
    "load_prompt_groups": "memflow_apps.shared.prompts",
    "match_videos": "memflow_apps.shared.prompts",
    "plot_segment_scores": ".report",
    "summarize": ".report",
    "write_reports": ".report",
    "EvalProtocol": ".protocol",
    "EvalResult": ".scoring",
    "VideoEntry": ".entries",
    "VideoReadError": "memflow_apps.shared.videos",
    "VideoScorer": ".scoring",
    "collect_videos": ".entries",
    "evaluate": ".scoring",
    "generate_videos": ".generation",
    "iter_video_batches": "memflow_apps.shared.videos",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "ClipFeatures",
    "DinoFeatures",
    "EvalProtocol",
    "EvalResult",
    "LinearAestheticPredictor",
    "PromptFileError",
    "PromptGroup",
    "SegmentScores",
    "VideoEntry",
    "VideoReadError",
    "VideoScorer",
    "VideoScores",
    "anchor_similarity",
    "boundary_similarity",
    "chunk_aligned_starts",
    "clip_score",
    "collect_videos",
    "evaluate",
    "generate_videos",
    "iter_video_batches",
    "load_prompt_groups",
    "match_videos",
    "plot_segment_scores",
    "score_video_features",
    "segment_ranges",
    "summarize",
    "temporal_consistency",
    "write_reports",
]
