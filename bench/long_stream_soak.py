"""Does a stream far longer than the model's RoPE table stay flat? Per-chunk time, process memory
and cache bytes of one multi-thousand-chunk video through a RoPE table of a few chunks.

Runs the real ``MemFlowStreamingPipeline`` on the embedded tiny random-weight Wan, latents only
(no VAE decode), with a 2-step schedule (timesteps 1000, 500), no memory trace and a prompt
switch (with its KV recache) every ``--chunks-per-prompt`` chunks, cycling three prompts. The
transformer's RoPE table is first cut to ``--rope-frames`` latent frames, exactly as a model built
with ``rope_max_seq_len=--rope-frames`` has it, so that the session re-bases its positions every
few chunks (architecture s.2b) for the whole video. The stream is iterated chunk by chunk; after
each ``next()`` the script records its wall time, ``StreamedChunk.report.cache_bytes``, the
process's resident memory (``/proc/self/statm``) and the session's ``position_base``.

Printed at chunks 10, 100, 1000 and 5000 (chunk ``n`` is the ``n``-th chunk streamed; those past
``--chunks`` are left out and the last chunk is added): the per-chunk time of the 201 chunks from
it on (the last 201 for the last chunk), their fastest and their median, and the RSS and cache
bytes at that chunk, each with its ratio to chunk 10 (all 1.00 when nothing grows with the
video), and the position base. The last line counts the latent frames streamed against the
table's length.

The ratios to read are the fastest chunk's: on a shared 2-core VM one chunk's time switches
between regimes (measured: 17 ms for fifty chunks, then 30 ms for fifty, then 17 again, on one
thread with nothing else running) that have nothing to do with the chunk's index; interference
only ever adds time, so the fastest chunk of a window is the chunk's own cost. The medians are
printed beside them to show the noise.

What is allowed to grow: the ``VideoStream`` keeps the video's initial noise (``stream.noise``,
drawn at once so that a seed gives the same video however it is streamed) in host memory,
``[1, 16, F, size / 8, size / 8]`` float32 for ``F = 3 * --chunks`` latent frames, 12 KiB per
chunk at 64 px, about 61 MB for 5000 chunks. It is allocated in full when the stream is made,
before chunk 1, so it is in every RSS row (not in the ratios) and is printed in the header. The
clean latents it keeps (``stream.recent``: what a recache reads back), the cache, the prompts'
conditioning and the memory trace are bounded.

A chunk takes 25-30 ms at the defaults (64 px, one or two threads), so the default 5000 chunks
take about 2.5 minutes. When another process shares the cores, pass ``--threads 1``: two threads
competing with it for two cores ran some chunks 50 times slower, which swamps the ratios.

    .venv/bin/python bench/long_stream_soak.py                          # 5000 chunks, ~2.5 min
    .venv/bin/python bench/long_stream_soak.py --chunks 60 --threads 1  # a few seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from streaming_scaling import latent_video  # bench/ is on sys.path when run as a script

from integrations.wan import shorten_rope_table
from memflow_adapter import MemFlowConfig
from memflow_adapter.config import PRESETS
from memflow_adapter.pipeline import MemFlowStreamingPipeline
from memflow_adapter.schedule import FlowMatchSchedule
from memflow_adapter.stream import VideoStream
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

#: Chunks (1-based) the table reports; the first is the baseline of the ratios.
CHECKPOINTS = (10, 100, 1000, 5000)
#: Chunks whose fastest and median times are reported at a checkpoint (from it on: a window
#: centred on chunk 10 would reach back into the cheaper chunks before the cache is full). Long
#: enough (about 4 s) to outlast a slow regime of the shared machine (tens of chunks) and to hold
#: four prompt switches' recaches.
WINDOW = 201
#: The 2-step schedule: the per-chunk cost is dominated by the transformer passes, not the count.
STEPS = (1000, 500)
#: Presets with a bounded window (full_history keeps every frame and cannot be re-based).
BOUNDED_PRESETS = tuple(name for name in PRESETS if name != "full_history")


@dataclass(frozen=True)
class Sample:
    """What one chunk cost and left behind."""

    seconds: float
    rss_bytes: int
    cache_bytes: int
    position_base: int


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=5000, help="chunks of 3 latent frames")
    parser.add_argument("--rope-frames", type=int, default=16,
                        help="latent frames of the shortened RoPE table")
    parser.add_argument("--preset", choices=BOUNDED_PRESETS, default="reference")
    parser.add_argument("--chunks-per-prompt", type=int, default=50)
    parser.add_argument("--size", type=int, default=64, help="video height = width in pixels")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.chunks < CHECKPOINTS[0]:
        parser.error(f"--chunks must be >= {CHECKPOINTS[0]} (the baseline chunk)")
    if args.chunks_per_prompt < 1:
        parser.error("--chunks-per-prompt must be >= 1")
    if args.size % 16 or args.size // 16 > args.rope_frames:
        parser.error(
            "--size must be a multiple of 16 (8x VAE, 2x2 patches) with at most --rope-frames "
            "patches per side (the table's height and width rows are cut too)"
        )
    return args


def rss_bytes() -> int:
    """Resident memory of this process now (``/proc/self/statm``'s second field, in pages)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_stream(pipe, args: argparse.Namespace) -> VideoStream:
    """The soak's video: ``--chunks`` chunks, a new prompt every ``--chunks-per-prompt``."""
    config = MemFlowConfig.preset(args.preset)
    streaming = MemFlowStreamingPipeline(
        pipe, config, schedule=FlowMatchSchedule(steps=STEPS), device="cpu"
    )
    return streaming.stream(**latent_video(args, config), record_trace=False)


def soak(stream: VideoStream) -> list[Sample]:
    """Run every chunk of ``stream``, one ``next()`` at a time, sampling after each."""
    samples = []
    while True:
        start = time.perf_counter()
        try:
            chunk = next(stream)
        except StopIteration:
            return samples
        seconds = time.perf_counter() - start
        samples.append(
            Sample(seconds, rss_bytes(), chunk.report.cache_bytes, stream.session.position_base)
        )


def reported_chunks(num_chunks: int) -> list[int]:
    """The checkpoints within the video, and its last chunk."""
    chunks = [c for c in CHECKPOINTS if c <= num_chunks]
    return chunks if chunks[-1] == num_chunks else [*chunks, num_chunks]


def window_seconds(samples: list[Sample], chunk: int) -> tuple[float, float]:
    """The fastest and the median time of the ``WINDOW`` chunks from ``chunk`` (1-based) on,
    moved back at the video's end."""
    first = max(0, min(chunk - 1, len(samples) - WINDOW))
    seconds = [s.seconds for s in samples[first : first + WINDOW]]
    return min(seconds), statistics.median(seconds)


def print_table(samples: list[Sample]) -> None:
    """Per reported chunk: time, RSS and cache bytes with their ratios to the first, and the
    position base."""
    chunks = reported_chunks(len(samples))
    base = samples[chunks[0] - 1]
    base_fastest, base_median = window_seconds(samples, chunks[0])
    print(
        f"\n{'chunk':>6}{'fastest ms':>11}{'x time':>8}{'median ms':>10}{'x time':>8}"
        f"{'RSS MB':>9}{'x RSS':>7}{'cache B':>10}{'x cache':>9}{'pos base':>10}"
    )
    for chunk in chunks:
        sample = samples[chunk - 1]
        fastest, median = window_seconds(samples, chunk)
        print(
            f"{chunk:>6}{fastest * 1e3:>11.1f}{fastest / base_fastest:>8.2f}"
            f"{median * 1e3:>10.1f}{median / base_median:>8.2f}"
            f"{sample.rss_bytes / 1e6:>9.1f}{sample.rss_bytes / base.rss_bytes:>7.2f}"
            f"{sample.cache_bytes:>10}{sample.cache_bytes / base.cache_bytes:>9.2f}"
            f"{sample.position_base:>10}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    pipe = build_tiny_wan_pipeline(seed=args.seed)
    shorten_rope_table(pipe.transformer, args.rope_frames)
    stream = open_stream(pipe, args)
    config = stream.pipeline.config
    noise, recent = stream.noise, stream.recent.frames
    print(
        f"tiny random-weight Wan, {args.size}x{args.size} px, RoPE table cut to "
        f"{args.rope_frames} latent frames, {args.preset} ({config.describe()}), {len(STEPS)} "
        f"steps, prompt switch every {args.chunks_per_prompt} chunks, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"the stream's initial noise: {tuple(noise.shape)} float32 = {noise.nbytes / 1e6:.1f} MB, "
        f"allocated before chunk 1 (in every RSS row); its recent clean latents: "
        f"{tuple(recent.shape)} = {recent.nbytes / 1e3:.1f} kB"
    )
    samples = soak(stream)
    print_table(samples)
    frames = len(samples) * config.frames_per_chunk
    print(
        f"\n{frames} latent frames through a {args.rope_frames}-frame RoPE table "
        f"(positions re-based by {samples[-1].position_base} frames); "
        f"total {time.perf_counter() - began:.1f} s"
    )


if __name__ == "__main__":
    main()
