"""What one denoising pass of one self-attention layer allocates and copies, per cache layout.

Timing cannot see a key-set copy on a 2-core CPU: it is under 1% of the attention kernel there,
below the noise (``bench/attention_overhead.py`` prints ``x kernel``, the pass over a bare kernel
on a key set of the same size). The memory it allocates is exact, so this script counts it:
for each layout a one-layer ``StreamingSession`` is brought to ``--chunk`` exactly as in
``attention_overhead.py``, one warm-up pass runs (SMA's key-set buffer is allocated once, then
reused), and one more pass runs under ``torch.profiler`` with ``profile_memory=True``. Printed
per layout: the frames attended, the size of the key set (keys and values), the bytes the pass
allocated (every op's own allocations, summed; the attention output is most of what is left) and
how many ``cat`` and ``gather`` calls it made.

    .venv/bin/python bench/key_set_copies.py            # reference geometry, 2 heads, seconds
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from attention_overhead import (  # bench/ is on sys.path when run as a script
    LAYOUTS,
    TEXT_TOKENS,
    Geometry,
    add_layer_arguments,
    attended_frames,
    open_measured_chunk,
    positive_int,
    random_qkv,
    random_tokens,
)
from torch.profiler import ProfilerActivity, profile

from memflow_adapter import StreamingSession


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_layer_arguments(parser, heads=2)
    parser.add_argument("--chunk", type=positive_int, default=8,
                        help="the chunk whose pass is profiled (8: sink, bank, window full)")
    return parser.parse_args(argv)


def profile_pass(session: StreamingSession, qkv: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """One warm-up pass, then one profiled: bytes allocated, ``cat`` and ``gather`` calls."""
    with session.denoise_pass():  # SMA's key-set buffer is allocated here, then reused
        session.attend(0, *qkv)
    activities = [ProfilerActivity.CPU]
    with profile(activities=activities, profile_memory=True) as prof, session.denoise_pass():
        session.attend(0, *qkv)
    events = prof.key_averages()
    calls = {event.key: event.count for event in events}
    return {
        "allocated": sum(max(0, event.self_cpu_memory_usage) for event in events),
        "cat": calls.get("aten::cat", 0),
        "gather": calls.get("aten::gather", 0),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
    args = parse_args(argv)
    geometry = Geometry(args.tokens_per_frame, args.heads, args.head_dim)
    generator = torch.Generator().manual_seed(args.seed)
    text_keys = random_tokens(generator, geometry, TEXT_TOKENS)
    qkv = random_qkv(generator, geometry, LAYOUTS[args.layouts[0]]().frames_per_chunk)
    print(
        f"one denoising pass of layer 0 at chunk {args.chunk}: {geometry.tokens_per_frame} "
        f"tokens/frame, {geometry.num_heads} heads x {geometry.head_dim}, float32, CPU"
    )
    print(f"{'layout':<14}{'frames':>7}{'key set MB':>12}{'allocated MB':>14}{'cat':>5}"
          f"{'gather':>8}")
    results = {}
    for name in args.layouts:
        session = open_measured_chunk(LAYOUTS[name](), geometry, args.chunk, text_keys,
                                      args.seed + 1)
        frames = attended_frames(session)
        key_set = 2 * frames * geometry.tokens_per_frame * geometry.num_heads * geometry.head_dim
        counts = profile_pass(session, qkv)
        results[name] = counts
        print(f"{name:<14}{frames:>7}{key_set * 4 / 1e6:>12.1f}"
              f"{counts['allocated'] / 1e6:>14.1f}{counts['cat']:>5}{counts['gather']:>8}")
    return results


if __name__ == "__main__":
    main()
