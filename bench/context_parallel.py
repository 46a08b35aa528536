"""Streaming chunk time and per-rank cache bytes with the pass split over 2 processes by diffusers'
Ulysses context parallelism (gloo on the CPU), against one process, side by side in one run.

The model is the Wan2.1-T2V-1.3B geometry (12 heads of 128, width 1536) with ``--blocks`` of its
30 blocks and random weights; the chunks stream with the ``--layout`` memory and the
deterministic 4-step schedule. One process runs with all ``--threads``, each of the two ranks
with half of them, so both use the same cores. CPU gloo is not a GPU interconnect: the ratio
here says what the exchange costs against splitting the same cores, not what 2 GPUs give.

    .venv/bin/python bench/context_parallel.py        # about 4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from bookkeeping import build_model  # bench/ is on sys.path when run as a script

from memflow_adapter import MemFlowConfig, apply_memflow
from memflow_adapter.config import PRESETS
from memflow_adapter.schedule import FlowMatchSchedule
from memflow_adapter.streaming import ChunkEngine, PromptConditioning, plan_chunks

TEXT_TOKENS = 64


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default="reference", choices=list(PRESETS))
    parser.add_argument("--blocks", type=int, default=1, help="Wan blocks (the model has 30)")
    parser.add_argument("--latent-height", type=int, default=30)
    parser.add_argument("--latent-width", type=int, default=52)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="threads of the one process")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def stream(args: argparse.Namespace) -> dict[str, float]:
    """This process's share of one stream: seconds per chunk (median once the cache is full),
    its cache and parameter bytes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    config = MemFlowConfig.preset(args.layout)
    model = build_model(args.blocks, seed=0)
    attachment = apply_memflow(model, config)
    if world > 1:
        attachment.enable_context_parallel(world)
    session = attachment.create_session(args.latent_height, args.latent_width, record_trace=False)
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, TEXT_TOKENS, model.config.text_dim, generator=generator)
    prompts = [PromptConditioning.of(attachment, embeds[i : i + 1]) for i in range(2)]
    frames = args.chunks * config.frames_per_chunk
    noise = torch.randn(1, 16, frames, args.latent_height, args.latent_width, generator=generator)
    video = torch.zeros_like(noise)
    # a prompt switch (with its recache) halfway
    chunks = plan_chunks([0, frames // 2 // config.frames_per_chunk * config.frames_per_chunk],
                         frames, config.frames_per_chunk)
    engine = ChunkEngine(model, session, FlowMatchSchedule(stochastic=False))
    seconds = []
    with attachment.bind(session), torch.no_grad():
        for chunk in chunks:
            if world > 1:
                torch.distributed.barrier()
            began = time.perf_counter()
            engine.step(chunk, prompts[chunk.segment], noise, video)
            seconds.append(time.perf_counter() - began)
    full = -(-config.cache_frames // config.frames_per_chunk)
    result = {
        "seconds_per_chunk": statistics.median(seconds[full:]),
        "cache_bytes": session.cache_bytes,
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "tokens_per_frame": session.tokens_per_frame,
    }
    if world > 1:
        torch.distributed.destroy_process_group()
    return result


def run(args: argparse.Namespace, world: int, out: Path) -> dict[str, float]:
    threads = args.threads if world == 1 else max(1, args.threads // world)
    options = ["--layout", args.layout, "--blocks", str(args.blocks), "--chunks",
               str(args.chunks), "--latent-height", str(args.latent_height), "--latent-width",
               str(args.latent_width), "--worker", str(out)]
    launch = [sys.executable]
    if world > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([*launch, __file__, *options], check=True, env=env)
    return json.loads(out.with_name(f"{out.name}-rank0").read_text())


def main(argv: Sequence[str] | None = None) -> float:
    args = parse_args(argv)
    if args.worker is not None:
        result = stream(args)
        rank = os.environ.get("RANK", "0")
        args.worker.with_name(f"{args.worker.name}-rank{rank}").write_text(json.dumps(result))
        return 0.0
    with tempfile.TemporaryDirectory() as folder:
        one = run(args, 1, Path(folder) / "one")
        two = run(args, 2, Path(folder) / "two")
    print(f"Wan2.1-1.3B geometry, {args.blocks} block(s), latent {args.latent_height}x"
          f"{args.latent_width} ({one['tokens_per_frame']} tokens per frame), {args.layout}, "
          f"float32, CPU: 1 process x {args.threads} threads vs 2 gloo ranks x "
          f"{max(1, args.threads // 2)}")
    ratio = two["seconds_per_chunk"] / one["seconds_per_chunk"]
    print(f"seconds per chunk: 1 process {one['seconds_per_chunk']:.3f}, 2 ranks "
          f"{two['seconds_per_chunk']:.3f}, 2 ranks / 1 process {ratio:.3f}")
    print(f"cache bytes per rank: 1 process {one['cache_bytes'] / 2**20:.1f} MiB, 2 ranks "
          f"{two['cache_bytes'] / 2**20:.1f} MiB ({two['cache_bytes'] / one['cache_bytes']:.2f}x)")
    print(f"parameter bytes per rank (replicated): {one['parameter_bytes'] / 2**20:.1f} MiB")
    return ratio


if __name__ == "__main__":
    main()
