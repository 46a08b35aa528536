"""What the memory costs inside one self-attention layer, per denoising pass of one chunk.

For four cache layouts, measured side by side in one run:

1. ``longlive``: the memory-free LongLive baseline (sink 3 + local window 9, no bank);
2. ``memflow``: MemFlow without SMA (sink 3 + bank 3 + local window 9);
3. ``memflow+sma``: MemFlow with Sparse Memory Activation (top 3 of sink + bank, then the window);
4. ``full_history``: no sink, no bank, no eviction (every earlier frame is attended).

Each layout gets a one-layer ``StreamingSession`` that is brought to the measured chunk through
the real chunk lifecycle (``begin_chunk`` with fixed text keys, then one context pass of random
q/k/v per chunk; denoising passes are skipped during the fill because only the context pass
writes). At the measured chunk, ``begin_chunk`` runs once (NAM's commit, not timed) and then
repeated denoising passes are timed, each ``with session.denoise_pass(): session.attend(0, q, k,
v)``: the library's own routing, concatenation, SMA selection and attention call. Denoising
passes are read-only, so they can be repeated on the same state. Repetitions are interleaved
across layouts (round-robin) after one warm-up pass each, and the median is reported with its
ratio to the LongLive baseline.

Beside each pass, in the same rounds, the bare attention kernel is timed on contiguous keys and
values of exactly the size that pass attends to (``attention(q, k, v)`` on tensors made once):
the floor a pass could reach. ``x kernel`` is the pass over its floor, so what it shows above
1.00 is the library's own cost (routing, key-set copies, SMA's selection and gather).

Random tensors stand in for the model's post-RoPE projections: the cost of attention does not
depend on their values. Only the attention of one layer is measured, not the projections, the
MLP or the cross-attention around it.

Defaults are the reference geometry (Wan2.1-T2V-1.3B at 480x832: 1560 tokens per frame, 3-frame
chunks, 12 heads x 128, float32 on CPU, batch 1), measured at chunk 20, when the bank is full
and the full-history layout attends 63 frames. On a 2-core machine shrink the heads::

    .venv/bin/python bench/attention_overhead.py --heads 2
    .venv/bin/python bench/attention_overhead.py --heads 4 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from memflow_adapter import MemFlowConfig, StreamingSession
from memflow_adapter.attention import attention

#: The layouts measured, in table order; the first one is the baseline of the ratios.
LAYOUTS: dict[str, Callable[[], MemFlowConfig]] = {
    "longlive": MemFlowConfig.longlive,
    "memflow": MemFlowConfig.reference,
    "memflow+sma": MemFlowConfig.reference_sma,
    "full_history": MemFlowConfig.full_history,
}
#: The clocks a pass can be timed with (``--clock``).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
BATCH_SIZE = 1
#: Text tokens of the prompt (the T5 sequence length of Wan2.1); NAM scores bank frames with them.
TEXT_TOKENS = 512


@dataclass(frozen=True)
class Geometry:
    """Token layout of one attention layer: ``[BATCH_SIZE, frames * tokens_per_frame, H, D]``."""

    tokens_per_frame: int
    num_heads: int
    head_dim: int


@dataclass
class Contender:
    """One layout under measurement: its session, opened at the measured chunk."""

    name: str
    session: StreamingSession
    fill_seconds: float
    samples: list[float]
    kernel_keys: torch.Tensor  # [B, attended tokens, H, D], contiguous
    kernel_values: torch.Tensor
    kernel_samples: list[float]


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def add_layer_arguments(parser: argparse.ArgumentParser, heads: int) -> None:
    """The one-layer setting every attention bench takes: geometry (reference defaults but
    ``heads``), layouts and seed."""
    parser.add_argument("--heads", type=positive_int, default=heads, help="attention heads H")
    parser.add_argument("--head-dim", type=positive_int, default=128, help="head width D")
    parser.add_argument(
        "--tokens-per-frame", type=positive_int, default=1560, help="tokens of one latent frame"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random tensor")
    parser.add_argument(
        "--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS),
        help="the layouts to measure (the first is the baseline of the ratios)",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; defaults are the reference geometry."""
    parser = argparse.ArgumentParser(
        description="Per-pass cost of memory-aware self-attention (one layer, one chunk) for "
        "LongLive, MemFlow, MemFlow+SMA and full history, measured side by side."
    )
    add_layer_arguments(parser, heads=12)
    parser.add_argument(
        "--chunk", type=positive_int, default=20, help="index of the chunk whose passes are timed"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="timed passes per layout (after warm-up)"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch)"
    )
    parser.add_argument(
        "--clock", choices=list(CLOCKS), default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (on a shared VM it leaves out the "
        "time other guests take the cores, which wall time charges to whichever pass ran)",
    )
    return parser.parse_args(argv)


def random_tokens(generator: torch.Generator, geometry: Geometry, num_tokens: int) -> torch.Tensor:
    """``[BATCH_SIZE, num_tokens, H, D]`` standard-normal float32 tokens."""
    shape = (BATCH_SIZE, num_tokens, geometry.num_heads, geometry.head_dim)
    return torch.randn(shape, generator=generator)


def random_qkv(
    generator: torch.Generator, geometry: Geometry, num_frames: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value of a pass over ``num_frames`` frames."""
    num_tokens = num_frames * geometry.tokens_per_frame
    return tuple(random_tokens(generator, geometry, num_tokens) for _ in range(3))


def open_measured_chunk(
    config: MemFlowConfig,
    geometry: Geometry,
    chunk: int,
    text_keys: torch.Tensor,
    seed: int,
) -> StreamingSession:
    """A one-layer session that has committed chunks ``0 .. chunk - 1`` and opened ``chunk``.

    Each committed chunk is one context pass of random q/k/v; every layout draws the same tokens
    (one generator per session, same seed), so they differ only in what they keep and attend.
    """
    session = StreamingSession(config, num_layers=1, tokens_per_frame=geometry.tokens_per_frame)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(chunk):
        session.begin_chunk([text_keys])
        with session.context_pass():
            session.attend(0, *random_qkv(generator, geometry, config.frames_per_chunk))
    session.begin_chunk([text_keys])
    return session


def attended_frames(session: StreamingSession) -> int:
    """Frames one pass of the open chunk attends to: memory (cut by SMA) + window + the chunk."""
    cache, config = session.layers[0], session.config
    memory = cache.sink_count + cache.bank_filled
    if config.sma:
        memory = min(memory, config.sma_top_k)
    return memory + cache.window_count + config.frames_per_chunk


def time_denoise_pass(
    session: StreamingSession, qkv: tuple[torch.Tensor, ...], clock: Callable[[], float]
) -> float:
    """Seconds one read-only denoising pass of layer 0 takes."""
    start = clock()
    with session.denoise_pass():
        session.attend(0, *qkv)
    return clock() - start


def time_kernel(contender: Contender, query: torch.Tensor, clock: Callable[[], float]) -> float:
    """Seconds the bare attention kernel takes on the contender's floor keys and values."""
    start = clock()
    attention(query, contender.kernel_keys, contender.kernel_values,
              contender.session.config.attention_backend)
    return clock() - start


def measure(
    contenders: list[Contender],
    qkv: tuple[torch.Tensor, ...],
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """One untimed warm-up pass and kernel per layout, then ``repeats`` rounds of one pass and
    one kernel per layout.

    Interleaving the rounds spreads slow drifts of the machine (other load, clock changes) over
    all layouts instead of charging them to whichever runs last.
    """
    for contender in contenders:
        time_denoise_pass(contender.session, qkv, clock)
        time_kernel(contender, qkv[0], clock)
    for _ in range(repeats):
        for contender in contenders:
            contender.samples.append(time_denoise_pass(contender.session, qkv, clock))
            contender.kernel_samples.append(time_kernel(contender, qkv[0], clock))


def print_geometry(args: argparse.Namespace, geometry: Geometry, frames_per_chunk: int) -> None:
    """The measured setting, so that a printed table can be read on its own."""
    print(
        f"geometry: batch {BATCH_SIZE}, {geometry.tokens_per_frame} tokens/frame, "
        f"{frames_per_chunk}-frame chunks ({frames_per_chunk * geometry.tokens_per_frame} query "
        f"tokens), {geometry.num_heads} heads x {geometry.head_dim}, float32, CPU"
    )
    print(
        f"measured chunk: {args.chunk} (chunks 0-{args.chunk - 1} filled by one context pass "
        "each), "
        f"{args.repeats} timed passes per layout ({args.clock} clock), seed {args.seed}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def print_table(contenders: list[Contender]) -> None:
    """Per layout: attended frames, median/min/max ms per pass, ratio to the first layout, the
    kernel's median and the pass over it."""
    baseline = statistics.median(contenders[0].samples)
    print(
        f"{'layout':<14}{'frames':>7}{'median ms':>11}{'min ms':>9}{'max ms':>9}"
        f"{'x ' + contenders[0].name:>13}{'kernel ms':>11}{'x kernel':>10}{'fill s':>8}"
    )
    for contender in contenders:
        median = statistics.median(contender.samples)
        kernel = statistics.median(contender.kernel_samples)
        print(
            f"{contender.name:<14}{attended_frames(contender.session):>7}"
            f"{median * 1e3:>11.1f}{min(contender.samples) * 1e3:>9.1f}"
            f"{max(contender.samples) * 1e3:>9.1f}{median / baseline:>13.3f}"
            f"{kernel * 1e3:>11.1f}{median / kernel:>10.3f}{contender.fill_seconds:>8.1f}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    run_start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    geometry = Geometry(args.tokens_per_frame, args.heads, args.head_dim)
    configs = {name: LAYOUTS[name]() for name in args.layouts}
    frames_per_chunk = configs[args.layouts[0]].frames_per_chunk
    print_geometry(args, geometry, frames_per_chunk)

    generator = torch.Generator().manual_seed(args.seed)
    text_keys = random_tokens(generator, geometry, TEXT_TOKENS)
    measured_qkv = random_qkv(generator, geometry, frames_per_chunk)
    contenders = []
    for name, config in configs.items():
        start = time.perf_counter()
        session = open_measured_chunk(config, geometry, args.chunk, text_keys, args.seed + 1)
        fill_seconds = time.perf_counter() - start
        floor = attended_frames(session) * geometry.tokens_per_frame
        contenders.append(Contender(
            name, session, fill_seconds, [], random_tokens(generator, geometry, floor),
            random_tokens(generator, geometry, floor), [],
        ))

    measure(contenders, measured_qkv, args.repeats, CLOCKS[args.clock])
    print_table(contenders)
    print(f"total: {time.perf_counter() - run_start:.1f} s")


if __name__ == "__main__":
    main()
