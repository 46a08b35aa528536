"""Does a chunk cost the same at chunk 100 as at chunk 2? Per-chunk latency and cache memory of
the whole streaming pipeline over a long video, for MemFlow, LongLive and full history.

Runs the real ``MemFlowStreamingPipeline`` (4 denoising passes + the context pass per chunk, NAM,
recache at prompt switches every ``--chunks-per-prompt`` chunks) on the embedded tiny
random-weight Wan, latents only (no VAE decode). Configurations run alternately, ``--repeats``
times each, in one process; a chunk's latency is the minimum over repetitions, smoothed by the
median over the 5 chunks around it. Printed as ratios:

* per config, latency and cache bytes at chunks 2, 10, 50 and 100 relative to chunk 2 (flat with
  a bounded memory, growing with full history);
* MemFlow (reference, and with SMA) versus LongLive: mean whole-chunk time after the cache is
  full.

    .venv/bin/python bench/streaming_scaling.py            # 100+ chunks, about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from memflow_adapter import MemFlowConfig
from memflow_adapter.hooks import remove_memflow
from memflow_adapter.pipeline import MemFlowStreamingPipeline, PromptSchedule
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

CONFIGS = ("reference", "reference_sma", "longlive", "full_history")
CHECKPOINTS = (2, 10, 50, 100)
PROMPTS = (
    "a red fox walks through a snowy forest",
    "a small boat sails on a blue lake",
    "the red fox walks back into the forest",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=104, help="chunks per video (>= 103)")
    parser.add_argument("--size", type=int, default=128, help="video height = width in pixels")
    parser.add_argument("--chunks-per-prompt", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.chunks < max(CHECKPOINTS) + 3:
        parser.error(f"--chunks must be >= {max(CHECKPOINTS) + 3} to smooth around chunk 100")
    return args


def latent_video(args: argparse.Namespace, config: MemFlowConfig) -> dict:
    """The arguments of one benchmark video: ``args.chunks`` chunks, latents only, ``PROMPTS`` in
    turn with a new one every ``args.chunks_per_prompt`` chunks, seeded with ``args.seed``."""
    segments = -(-args.chunks // args.chunks_per_prompt)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(segments)]
    frames_per_prompt = args.chunks_per_prompt * config.frames_per_chunk
    return dict(
        prompt=PromptSchedule.from_prompts(prompts, frames_per_prompt),
        num_latent_frames=args.chunks * config.frames_per_chunk,
        height=args.size,
        width=args.size,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="latent",
        max_sequence_length=32,
    )


def run(pipe, config_name: str, args: argparse.Namespace) -> tuple[list[float], list[int]]:
    """One video; returns per-chunk seconds and cache bytes."""
    config = MemFlowConfig.preset(config_name)
    streaming = MemFlowStreamingPipeline(pipe, config, device="cpu")
    try:
        result = streaming(**latent_video(args, config), progress=False)
    finally:
        remove_memflow(pipe.transformer)
    return [c.seconds for c in result.chunks], [c.cache_bytes for c in result.chunks]


def around(values: list[float], chunk: int) -> float:
    return statistics.median(values[chunk - 2 : chunk + 3])


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = build_tiny_wan_pipeline(seed=args.seed)
    tokens = (args.size // pipe.vae_scale_factor_spatial // 2) ** 2
    print(
        f"tiny random-weight Wan, {args.size}x{args.size} px ({tokens} tokens per latent "
        f"frame), {args.chunks} chunks of 3 latent frames, prompt switch every "
        f"{args.chunks_per_prompt} chunks, {torch.get_num_threads()} threads"
    )
    seconds = {name: [] for name in CONFIGS}
    cache_bytes = {}
    began = time.perf_counter()
    for _ in range(args.repeats):
        for name in CONFIGS:
            run_seconds, cache_bytes[name] = run(pipe, name, args)
            seconds[name].append(run_seconds)
    best = {
        name: [min(times) for times in zip(*runs, strict=True)] for name, runs in seconds.items()
    }

    header = "".join(f"{f'chunk {c}':>11}" for c in CHECKPOINTS)
    print(f"\nper-chunk latency relative to chunk 2 (median of chunks c-2..c+2)\n{'':14}{header}")
    for name in CONFIGS:
        base = around(best[name], CHECKPOINTS[0])
        print(f"{name:14}" + "".join(f"{around(best[name], c) / base:11.2f}" for c in CHECKPOINTS))
    print(f"\ncache bytes relative to chunk 2\n{'':14}{header}")
    for name in CONFIGS:
        base = cache_bytes[name][CHECKPOINTS[0]]
        print(f"{name:14}" + "".join(f"{cache_bytes[name][c] / base:11.2f}" for c in CHECKPOINTS))

    steady = slice(10, args.chunks)
    longlive = statistics.mean(best["longlive"][steady])
    print("\nwhole-chunk time vs longlive (mean over chunks 10..end)")
    for name in ("reference", "reference_sma", "full_history"):
        print(
            f"{name:14}{statistics.mean(best[name][steady]) / longlive:11.2f}"
            f"   ({statistics.mean(best[name][steady]) * 1e3:.1f} ms per chunk)"
        )
    print(f"{'longlive':14}{1.0:11.2f}   ({longlive * 1e3:.1f} ms per chunk)")
    print(f"\ntotal: {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
