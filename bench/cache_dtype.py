"""What a quantized KV cache saves and costs at the real Wan2.1-T2V-1.3B geometry: cache bytes,
whole-chunk time and output drift of ``cache_dtype="float8_e4m3fn"`` and ``"int8"`` against the
cache in the model dtype, measured side by side in one run.

The model is a ``diffusers.WanTransformer3DModel`` with the Wan2.1-T2V-1.3B config
(``WAN21_T2V_1_3B_TRANSFORMER``: 12 heads x 128, width 1536, FFN 8960, text width 4096) cut to
``--blocks`` blocks, diffusers' default random init, cast to ``--dtype`` as ``from_pretrained``
loads it (its ``_keep_in_fp32_modules``, RoPE included, stay as built). The inputs stand in for
a 480x832 video: latents ``[1, 16, 3, 60, 104]`` per chunk (1560 tokens per latent frame with 2x2
patches, 4680 per chunk) and prompt embeddings ``[1, 512, 4096]``, all drawn once from one seeded
generator, so every contender sees the same tensors chunk for chunk.

Each contender (cache in the model dtype, float8_e4m3fn, int8) gets its own session on the same
``--preset`` layout, attached to the one model in turn (``apply_memflow`` before its chunk,
``remove_memflow`` after, outside the timed region) and driven as the streaming pipeline drives
it: ``begin_chunk`` with the prompt's NAM text keys (computed once, as for one prompt), ``--steps``
read-only ``denoise_pass`` forwards at timesteps ``1000 * (1 - i / steps)`` (1000, 500), then the
``context_pass`` forward at timestep 0, each through ``call_transformer``. The sessions are first
filled up to the first chunk that opens on a full cache (sink, bank and window; chunk 7 with the
reference layout, whose bank takes its third frame then) by context passes only: denoising passes
are read-only, so they would not change the cache. Then ``--repeats`` whole chunks are timed per
contender, interleaved round-robin (all contenders at the same chunk in each round), and printed:

* median seconds per chunk and its ratio to the model-dtype cache;
* the stored frames' bytes (keys and values of every layer, scales and the bank's staged frame
  included) in MB, its ratio, and bytes per cached frame per layer; then the pass slot's MB
  (one chunk per layer, unquantized caches only; ``session.cache_bytes`` is the sum of both);
* the seconds of one re-base of every layer's full cache (rotating its keys by 100 positions,
  architecture s.2b; a stream past the RoPE table pays it once per re-base, every ~1000 frames
  for Wan) and its ratio to a chunk;
* max and RMS difference of the last denoising pass's output (the predicted flow ``[1, 16, 3,
  60, 104]``) of the last timed chunk against the model-dtype contender's (the RMS of which is
  printed for scale).

Expected duration of the default run (1 block, bfloat16, reference, latent 60x104), extrapolated
from a measured run at latent 20x36 (1.6 s per chunk, 17.5 s in all, one thread) with the
flop counts of the full geometry (a full-cache pass attends 4680 queries to 23400 keys): about
40 s per timed chunk and 10 minutes in all on one thread, about half that on 2 idle cores. Pass
``--threads 1`` when another process shares the cores: oversubscribed threads run far slower.
Smoke runs shrink the latent::

    .venv/bin/python bench/cache_dtype.py                                # ~5-10 min on 2 cores
    .venv/bin/python bench/cache_dtype.py --latent-size 8 8 --repeats 1  # a few seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from attention_overhead import positive_int  # bench/ is on sys.path when run as a script
from diffusers import WanTransformer3DModel

from integrations.wan import WAN21_T2V_1_3B_TRANSFORMER
from memflow_adapter import MemFlowConfig, StreamingSession
from memflow_adapter.config import PRESETS
from memflow_adapter.hooks import MemFlowAttachment, apply_memflow, remove_memflow
from memflow_adapter.streaming import call_transformer

#: The contenders' ``cache_dtype``, in table order; the first (the model dtype) is the baseline.
CACHE_DTYPES = (None, "float8_e4m3fn", "int8")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
#: Presets with a bounded window: their cache fills, then stays the same size.
BOUNDED_PRESETS = tuple(name for name in PRESETS if name != "full_history")
BATCH_SIZE = 1
#: Text tokens of a prompt (Wan2.1's T5 sequence length).
TEXT_TOKENS = 512


@dataclass(frozen=True)
class Inputs:
    """Every tensor the run feeds the model, shared by all contenders.

    Attributes:
        latents: ``[1, 16, chunks * frames_per_chunk, h, w]`` float32; chunk ``i`` reads frames
            ``i * frames_per_chunk ..``.
        prompt_embeds: ``[1, TEXT_TOKENS, text_dim]`` in the model dtype.
        text_keys: per layer ``[1, TEXT_TOKENS, H, D]``, NAM's keys of the prompt.
        timesteps: the denoising passes' timesteps.
    """

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    text_keys: list[torch.Tensor]
    timesteps: tuple[float, ...]


@dataclass
class Contender:
    """One cache dtype under measurement: its session and what its chunks gave."""

    name: str
    session: StreamingSession
    fill_seconds: float = 0.0
    samples: list[float] = field(default_factory=list)
    output: torch.Tensor | None = None  # the last timed chunk's last denoising output
    rebase_seconds: float = 0.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=positive_int, default=1, help="transformer blocks")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16",
                        help="the model's (and the unquantized cache's) dtype")
    parser.add_argument("--preset", choices=BOUNDED_PRESETS, default="reference")
    parser.add_argument("--steps", type=positive_int, default=2, help="denoising passes per chunk")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timed chunks per contender")
    parser.add_argument("--latent-size", type=positive_int, nargs=2, default=(60, 104),
                        metavar=("H", "W"), help="latent height and width (480x832 px: 60 104)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    args = parser.parse_args(argv)
    if any(size % 2 for size in args.latent_size):
        parser.error("--latent-size must be even (2x2 patches)")
    return args


def cast_like_from_pretrained(model: WanTransformer3DModel, dtype: torch.dtype) -> None:
    """Cast every parameter and buffer to ``dtype`` except those of the model's
    ``_keep_in_fp32_modules`` (RoPE tables, time embedder, norms), as ``from_pretrained`` does."""
    keep = set(model._keep_in_fp32_modules or ())
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if keep.isdisjoint(name.split(".")):
            tensor.data = tensor.data.to(dtype)


def build_model(blocks: int, dtype: torch.dtype, seed: int) -> WanTransformer3DModel:
    """Wan2.1-T2V-1.3B's transformer with ``blocks`` blocks and seeded default random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**{**WAN21_T2V_1_3B_TRANSFORMER, "num_layers": blocks})
    cast_like_from_pretrained(model, dtype)
    return model.eval()


@contextmanager
def attached(model: WanTransformer3DModel, config: MemFlowConfig) -> Iterator[MemFlowAttachment]:
    """MemFlow with ``config`` on ``model`` inside the block only."""
    attachment = apply_memflow(model, config)
    try:
        yield attachment
    finally:
        remove_memflow(model)


def chunks_to_fill(config: MemFlowConfig) -> int:
    """Index of the first chunk that opens on a full cache (sink, bank and window), from a dry
    run of a one-layer session of one-token frames ``[1, frames, 1, 8]``."""
    session = StreamingSession(config, num_layers=1, tokens_per_frame=1, record_trace=False)
    text_keys = [torch.ones(1, TEXT_TOKENS, 1, 8)]
    tokens = torch.ones(1, config.frames_per_chunk, 1, 8)
    full = (config.sink_frames, config.bank_frames, config.window_capacity)
    while True:
        session.begin_chunk(text_keys)
        cache = session.layers[0]
        if (cache.sink_count, cache.bank_filled, cache.window_count) == full:
            return session.chunk_index
        with session.context_pass():
            session.attend(0, tokens, tokens, tokens)


def chunk_latents(inputs: Inputs, session: StreamingSession) -> torch.Tensor:
    """``[1, 16, frames_per_chunk, h, w]``: the latents of the session's next chunk."""
    frames = session.config.frames_per_chunk
    start = session.chunk_index * frames
    return inputs.latents[:, :, start : start + frames]


def fill(model: WanTransformer3DModel, contender: Contender, inputs: Inputs, chunks: int) -> None:
    """Commit ``chunks`` chunks to the contender's session, one context pass each."""
    session = contender.session
    start = time.perf_counter()
    with attached(model, session.config) as attachment, attachment.bind(session):
        for _ in range(chunks):
            latents = chunk_latents(inputs, session)
            session.begin_chunk(inputs.text_keys)
            with session.context_pass():
                call_transformer(model, latents, 0.0, inputs.prompt_embeds, model.dtype)
    contender.fill_seconds = time.perf_counter() - start


def timed_chunk(model: WanTransformer3DModel, contender: Contender, inputs: Inputs) -> None:
    """One whole chunk (NAM commit, denoising passes, context pass), timed; keeps the last
    denoising pass's output ``[1, 16, frames_per_chunk, h, w]``."""
    session = contender.session
    with attached(model, session.config) as attachment, attachment.bind(session):
        latents = chunk_latents(inputs, session)
        start = time.perf_counter()
        session.begin_chunk(inputs.text_keys)
        for timestep in inputs.timesteps:
            with session.denoise_pass():
                output = call_transformer(
                    model, latents, timestep, inputs.prompt_embeds, model.dtype
                )
        with session.context_pass():
            call_transformer(model, latents, 0.0, inputs.prompt_embeds, model.dtype)
        contender.samples.append(time.perf_counter() - start)
    contender.output = output


def time_rebase(
    model: WanTransformer3DModel, contender: Contender, latent_size: Sequence[int],
    shift: int = 100,
) -> None:
    """One re-base of every layer's full cache by ``shift`` positions (architecture s.2b), on a
    copy of the contender's session: what a stream past the RoPE table pays once per re-base."""
    with attached(model, contender.session.config) as attachment:
        copy = attachment.create_session(*latent_size, record_trace=False)
        copy.load_state_dict(contender.session.state_dict())
        start = time.perf_counter()
        for cache in copy.layers:
            cache.rebase(shift, copy.config.position_overflow, attachment.integration.rotate_keys)
        contender.rebase_seconds = time.perf_counter() - start


def make_inputs(
    model: WanTransformer3DModel, args: argparse.Namespace, config: MemFlowConfig, chunks: int
) -> Inputs:
    """Latents for ``chunks`` chunks and one prompt, from one generator seeded ``--seed``."""
    generator = torch.Generator().manual_seed(args.seed)
    height, width = args.latent_size
    shape = (BATCH_SIZE, model.config.in_channels, chunks * config.frames_per_chunk, height, width)
    latents = torch.randn(shape, generator=generator)
    prompt_embeds = torch.randn(
        (BATCH_SIZE, TEXT_TOKENS, model.config.text_dim), generator=generator
    ).to(model.dtype)
    with attached(model, config) as attachment:
        text_keys = attachment.text_keys(prompt_embeds)
    timesteps = tuple(1000.0 * (1 - step / args.steps) for step in range(args.steps))
    return Inputs(latents, prompt_embeds, text_keys, timesteps)


def frame_slots(session: StreamingSession) -> int:
    """Frames every layer's cache holds room for now (sink, bank, window, staged frame)."""
    cache = session.layers[0]
    return sum(b.num_frames for b in (cache.keys, cache.staged_keys) if b is not None)


def stored_bytes(session: StreamingSession) -> int:
    """Bytes of every layer's stored frames (the pass slot left out)."""
    return sum(cache.nbytes for cache in session.layers)


def print_table(contenders: list[Contender]) -> None:
    """Per contender: time, cache size and output difference, against the first."""
    base = contenders[0]
    base_seconds = statistics.median(base.samples)
    reference = base.output.float()
    print(
        f"{'cache':<18}{'s/chunk':>9}{'x time':>8}{'cache MB':>10}{'x bytes':>9}"
        f"{'B/frame/layer':>15}{'slot MB':>9}"
        f"{'max |diff|':>12}{'RMS diff':>10}{'fill s':>8}{'re-base s':>11}{'x chunk':>9}"
    )
    base_bytes = stored_bytes(base.session)
    for contender in contenders:
        session, seconds = contender.session, statistics.median(contender.samples)
        stored = stored_bytes(session)
        per_frame = stored / (session.num_layers * frame_slots(session))
        slot = sum(cache.pass_nbytes for cache in session.layers)
        diff = contender.output.float() - reference
        print(
            f"{contender.name:<18}{seconds:>9.2f}{seconds / base_seconds:>8.2f}"
            f"{stored / 1e6:>10.1f}{stored / base_bytes:>9.2f}{per_frame:>15.0f}"
            f"{slot / 1e6:>9.1f}"
            f"{diff.abs().max().item():>12.2e}{diff.square().mean().sqrt().item():>10.2e}"
            f"{contender.fill_seconds:>8.1f}{contender.rebase_seconds:>11.3f}"
            f"{contender.rebase_seconds / seconds:>9.3f}"
        )
    print(f"RMS of the {base.name} output: {reference.square().mean().sqrt().item():.3e}")


@torch.no_grad()
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    run_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    model = build_model(args.blocks, DTYPES[args.dtype], args.seed)
    config = MemFlowConfig.preset(args.preset)
    warm_chunks = chunks_to_fill(config)
    inputs = make_inputs(model, args, config, warm_chunks + args.repeats)
    height, width = args.latent_size
    contenders = []
    for cache_dtype in CACHE_DTYPES:
        contender_config = dataclasses.replace(config, cache_dtype=cache_dtype)
        with attached(model, contender_config) as attachment:
            session = attachment.create_session(height, width, record_trace=False)
        contenders.append(Contender(cache_dtype or f"{args.dtype} (model)", session))
    tokens = contenders[0].session.tokens_per_frame
    print(
        f"Wan2.1-T2V-1.3B geometry, {args.blocks} block(s), {args.dtype}, latent {height}x{width} "
        f"({tokens} tokens/frame), {args.preset} ({config.describe()}), {args.steps} denoising "
        f"passes + context pass per chunk"
    )
    print(
        f"filled by context passes to chunk {warm_chunks}, then {args.repeats} timed chunks per "
        f"contender, interleaved; seed {args.seed}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    for contender in contenders:
        fill(model, contender, inputs, warm_chunks)
    for _ in range(args.repeats):
        for contender in contenders:
            timed_chunk(model, contender, inputs)
    for contender in contenders:
        time_rebase(model, contender, args.latent_size)
    print_table(contenders)
    print(f"total: {time.perf_counter() - run_start:.1f} s")


if __name__ == "__main__":
    main()
