"""What each preset computes on the embedded tiny Wan, as a recording: final latents and every
chunk's memory picks (bank frames per layer, SMA's activated frames per layer and pass).

``tests/fixtures/preset_streams.pt`` was written by ``python -m tests.preset_streams`` before the
memory-policy refactor (issue 34), and ``tests/test_policy_presets.py`` holds every later version
of the engine to it. Never re-record it to make that test pass: a change that alters what a preset
computes needs a reason in DESIGN and its own test.
"""

from __future__ import annotations

from pathlib import Path

import torch

from memflow_adapter import MemFlowConfig
from memflow_adapter.hooks import get_memflow, remove_memflow
from memflow_adapter.pipeline import MemFlowStreamingPipeline
from memflow_adapter.streaming import PromptSchedule

RECORDING = Path(__file__).parent / "fixtures" / "preset_streams.pt"

#: 12 chunks of 3 latent frames: the reference bank (record_interval 3) fills at chunk 9 and
#: selects with NAM from chunk 10 on; prompts switch twice (two recaches).
PROMPTS = PromptSchedule(
    (("a red fox walks in the snow", 0), ("a boat on a blue lake", 12), ("the red fox again", 24))
)
NUM_LATENT_FRAMES = 36

#: The presets, and the variants that reach every branch of the memory: interval staging, a
#: quantized cache, SMA with a smaller top-k and a fast-filling bank.
CASES: dict[str, MemFlowConfig] = {
    "reference": MemFlowConfig.reference(),
    "reference_sma": MemFlowConfig.reference_sma(),
    "longlive": MemFlowConfig.longlive(),
    "full_history": MemFlowConfig.full_history(),
    "interval_staging": MemFlowConfig.reference(bank_staging="interval", record_interval=1),
    "sma_top2_fast_bank": MemFlowConfig.reference_sma(sma_top_k=2, record_interval=1),
    "sma_int8": MemFlowConfig.reference_sma(record_interval=1, cache_dtype="int8"),
}


def preset_stream(pipe, config: MemFlowConfig) -> dict[str, torch.Tensor]:
    """One case's recording: ``latents`` ``[1, C, F, h, w]``, and per chunk ``bank.<chunk>``
    ``[layers, B, filled]`` and ``activated.<chunk>`` ``[layers, passes, B, H, k]`` (int64)."""
    if get_memflow(pipe.transformer) is not None:
        remove_memflow(pipe.transformer)
    streaming = MemFlowStreamingPipeline(pipe, config, device="cpu")
    result = streaming(
        prompt=PROMPTS,
        num_latent_frames=NUM_LATENT_FRAMES,
        height=32,
        width=32,
        output_type="latent",
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(7),
        progress=False,
    )
    recording = {"latents": result.latents}
    for chunk in result.trace:
        layers = sorted(chunk.bank)
        if layers:
            recording[f"bank.{chunk.chunk_index}"] = torch.tensor(
                [chunk.bank[layer] for layer in layers]
            )
        if chunk.activated:
            recording[f"activated.{chunk.chunk_index}"] = torch.tensor(
                [[p.frames for p in chunk.activated[layer]] for layer in sorted(chunk.activated)]
            )
    return recording


def record_all(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {name: preset_stream(pipe, config) for name, config in CASES.items()}


def main() -> None:
    from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

    recordings = record_all(build_tiny_wan_pipeline(seed=0))
    configs = {name: config.to_dict() for name, config in CASES.items()}
    torch.save({"recordings": recordings, "configs": configs}, RECORDING)
    print(f"wrote {RECORDING} ({', '.join(recordings)})")


if __name__ == "__main__":
    main()
