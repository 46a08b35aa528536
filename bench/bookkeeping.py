"""What the library's bookkeeping costs: our chunk loop against a plain streaming loop over the
same model, side by side in one run.

The model is a Wan2.1-T2V-1.3B transformer (its diffusers config, ``--blocks`` of its 30 blocks,
random weights) at a 480x832 video's latent size by default. Both loops run the same chunks, 4
denoising steps and a context pass each, with the same noise:

* ``ours``: ``ChunkEngine.step`` with MemFlow attached (``--layout``, default ``longlive``): the
  session's pass lifecycle, its plan and checks, the hooks, the cache's regions and commit;
* ``plain``: what a Self-Forcing-style loop does without a library: per layer a preallocated
  ``[sink | window | chunk]`` K/V buffer, the chunk's K/V written after the cached frames, one
  SDPA over that view, the window rolled on the context pass; RoPE offset by the chunk's frame.
  It keeps LongLive's layout (sink 3 + local window 9), so with ``--layout longlive`` the two
  attend to the same frames and compute the same video (the script prints their difference).

Both use the model's own q/k/v code (the Wan integration's processor) and the same schedule, so
what differs is the bookkeeping alone. Chunks alternate between the loops, which goes first
alternating too; the time per chunk is the median over the chunks after the cache is full, and
``ours / plain`` its ratio. ``--clock cpu`` times the process's CPU time, which this shared VM's
slow spells (tens of chunks at a time) move much less than wall time.

    .venv/bin/python bench/bookkeeping.py                     # 1 block at 480x832, float32
    .venv/bin/python bench/bookkeeping.py --layout reference_sma
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from integrations.wan import (
    WAN21_T2V_1_3B_TRANSFORMER,
    WanIntegration,
    WanStreamingSelfAttnProcessor,
)
from memflow_adapter import MemFlowConfig, apply_memflow
from memflow_adapter.config import PRESETS
from memflow_adapter.schedule import FlowMatchSchedule
from memflow_adapter.streaming import ChunkEngine, ChunkPlan, PromptConditioning, call_transformer

SINK, LOCAL, CHUNK = 3, 9, 3  # LongLive's layout, in latent frames
TEXT_TOKENS = 64


class PlainKVCache:
    """One layer's K/V of the plain loop: ``[sink | window | chunk]`` preallocated, filled in
    order; the window rolls left by a chunk once it is full."""

    def __init__(self, tokens_per_frame: int) -> None:
        self.tokens = tokens_per_frame
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.frames = 0  # frames cached, at most SINK + LOCAL - CHUNK

    def attend(self, query, key, value, commit: bool) -> torch.Tensor:
        t, n = self.tokens, key.shape[1] // self.tokens
        if self.keys is None:
            shape = (key.shape[0], (SINK + LOCAL) * t, *key.shape[2:])
            self.keys, self.values = torch.zeros(shape, dtype=key.dtype), torch.zeros(shape)
        stop = (self.frames + n) * t
        self.keys[:, self.frames * t : stop] = key
        self.values[:, self.frames * t : stop] = value
        output = F.scaled_dot_product_attention(
            query.transpose(1, 2), self.keys[:, :stop].transpose(1, 2),
            self.values[:, :stop].transpose(1, 2),
        ).transpose(1, 2)
        if commit:
            self.frames += n
            kept = SINK + LOCAL - CHUNK
            if self.frames > kept:  # drop the oldest window frames
                drop = self.frames - kept
                for buffer in (self.keys, self.values):
                    buffer[:, SINK * t : kept * t] = buffer[:, (SINK + drop) * t : stop].clone()
                self.frames = kept
        return output


class PlainStreamer:
    """The plain loop's state: per layer a ``PlainKVCache``, the chunk's first frame for RoPE,
    and whether the running pass commits."""

    def __init__(self, model: WanTransformer3DModel, tokens_per_frame: int) -> None:
        self.caches = [PlainKVCache(tokens_per_frame) for _ in model.blocks]
        self.offset = torch.zeros((), dtype=torch.long)
        self.commit = False
        integration = WanIntegration(model)
        rope = model.rope
        rope.forward = lambda hidden_states: integration.rope_forward(
            rope, self.offset, hidden_states
        )
        for layer, block in enumerate(model.blocks):
            block.attn1.set_processor(WanStreamingSelfAttnProcessor(layer, self.attend))

    def attend(self, layer, query, key, value) -> torch.Tensor:
        return self.caches[layer].attend(query, key, value, self.commit)


def build_model(blocks: int, seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**WAN21_T2V_1_3B_TRANSFORMER, "num_layers": blocks}).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    return model


def plain_chunk(model, streamer: PlainStreamer, schedule, noise, embeds) -> torch.Tensor:
    """One chunk of the plain loop: the steps of ``ChunkEngine.denoise`` (deterministic), then
    the context pass."""
    noisy, steps = noise.double(), schedule.timesteps
    streamer.commit = False
    for index, step in enumerate(steps):
        flow = call_transformer(model, noisy, float(step), embeds, torch.float32).double()
        clean = schedule.predict_clean(noisy, flow, schedule.sigma_at(step))
        if index + 1 < len(steps):
            eps = schedule.predict_noise(clean, flow)
            noisy = schedule.renoise(clean, eps, schedule.sigma_at(steps[index + 1]))
    clean = clean.float()
    streamer.commit = True
    call_transformer(model, clean, 0.0, embeds, torch.float32)
    streamer.offset += noise.shape[2]
    return clean


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default="longlive", choices=list(PRESETS))
    parser.add_argument("--blocks", type=int, default=1, help="Wan blocks (the model has 30)")
    parser.add_argument("--latent-height", type=int, default=60)
    parser.add_argument("--latent-width", type=int, default=104)
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> float:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = MemFlowConfig.preset(args.layout)
    ours_model = build_model(args.blocks, args.seed)
    plain_model = copy.deepcopy(ours_model)
    attachment = apply_memflow(ours_model, config)
    session = attachment.create_session(args.latent_height, args.latent_width, record_trace=False)
    streamer = PlainStreamer(plain_model, session.tokens_per_frame)
    schedule = FlowMatchSchedule(stochastic=False)
    generator = torch.Generator().manual_seed(args.seed)
    embeds = torch.randn(1, TEXT_TOKENS, ours_model.config.text_dim, generator=generator)
    cond = PromptConditioning.of(attachment, embeds)
    frames = args.chunks * CHUNK
    noise = torch.randn(1, 16, frames, args.latent_height, args.latent_width, generator=generator)
    video = torch.zeros_like(noise)
    engine = ChunkEngine(ours_model, session, schedule)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    seconds = {"ours": [], "plain": []}
    plain_video = []
    with attachment.bind(session), torch.no_grad():
        for index in range(args.chunks):
            chunk = ChunkPlan(index, index * CHUNK, (index + 1) * CHUNK, 0, False)
            for name in ("ours", "plain") if index % 2 else ("plain", "ours"):
                began = clock()
                if name == "ours":
                    engine.step(chunk, cond, noise, video)
                else:
                    plain_video.append(plain_chunk(
                        plain_model, streamer, schedule, noise[:, :, chunk.start : chunk.stop],
                        embeds,
                    ))
                seconds[name].append(clock() - began)
    full = -(-(SINK + LOCAL - CHUNK) // CHUNK)  # the first chunk whose window is full
    ours, plain = (statistics.median(seconds[name][full:]) for name in ("ours", "plain"))
    difference = (video - torch.cat(plain_video, dim=2)).abs().max().item()
    print(f"Wan2.1-1.3B geometry, {args.blocks} block(s), latent {args.latent_height}x"
          f"{args.latent_width} ({session.tokens_per_frame} tokens per frame), float32, "
          f"{torch.get_num_threads()} threads; chunks {full}..{args.chunks - 1}, {args.clock} "
          "clock")
    print(f"seconds per chunk: ours ({args.layout}) {ours:.3f}, plain loop (longlive) "
          f"{plain:.3f}, ours / plain {ours / plain:.3f}")
    print(f"largest |ours - plain| of the latents: {difference:.2e}"
          f"{' (the same frames attended)' if args.layout == 'longlive' else ''}")
    return ours / plain


if __name__ == "__main__":
    main()
