"""``torch.compile`` on a MemFlow stream: what it compiles, whether it stops, and the speed-up.

The tiny Wan transformer (``memflow_apps.shared.tiny_wan``, random weights, ``--layers`` blocks)
with MemFlow attached streams ``--chunks`` chunks, switching between two prompts every
``--switch-every`` chunks (each switch recaches), once eagerly and once through
``torch.compile(transformer, backend=...)``, side by side in one process. A counting backend wraps
the compiler, so the script sees every graph compiled and every call of a compiled graph (a frame
dynamo gives up on, e.g. at its recompile limit, runs eagerly and calls none).

Printed: graphs compiled while the cache fills, in the first full chunk onwards (the first
recache compiles its pass once; nothing else should compile), compiled calls per chunk against
the passes each chunk runs, the largest difference of the latents to eager, and the steady-state
time per chunk of both (median of the second half of the chunks) with their ratio.

    .venv/bin/python bench/compile_stream.py                      # inductor, reference_sma
    .venv/bin/python bench/compile_stream.py --backend aot_eager  # dynamo + AOT autograd only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch._dynamo.backends.common import aot_autograd

from memflow_adapter import MemFlowConfig, apply_memflow
from memflow_adapter.config import PRESETS
from memflow_adapter.schedule import FlowMatchSchedule
from memflow_adapter.streaming import ChunkEngine, ChunkPlan, PromptConditioning
from memflow_apps.shared.tiny_wan import build_tiny_wan_transformer

FRAMES_PER_CHUNK = 3
STEPS = FlowMatchSchedule(stochastic=False)


class CountingBackend:
    """A ``torch.compile`` backend: compiles with ``compiler``, counts graphs and their calls."""

    def __init__(self, compiler: Callable) -> None:
        self.compiler = compiler
        self.graphs = 0
        self.calls = 0

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1
        compiled = self.compiler(graph_module, example_inputs)

        def run(*args):
            self.calls += 1
            return compiled(*args)

        return run


def compiler_named(name: str) -> Callable:
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx
    return aot_autograd(fw_compiler=lambda graph_module, _: graph_module)


@dataclass
class StreamRun:
    """One stream: per chunk its seconds and, compiled, the graphs and calls so far."""

    seconds: list[float]
    graphs: list[int]
    calls: list[int]
    first_full_chunk: int
    latents: torch.Tensor


def cache_is_full(session) -> bool:
    cache, config = session.layers[0], session.config
    return (cache.sink_count, cache.bank_filled, cache.window_count) == (
        config.sink_frames, config.bank_frames, config.window_capacity
    )


def recaches(index: int, switch_every: int) -> bool:
    return index > 0 and index % switch_every == 0


def run_stream(args: argparse.Namespace, backend: CountingBackend | None) -> StreamRun:
    torch._dynamo.reset()  # compiled code is cached per code object, across models
    config = MemFlowConfig.preset(args.layout)
    model = build_tiny_wan_transformer(seed=0, num_layers=args.layers)
    attachment = apply_memflow(model, config)
    session = attachment.create_session(args.latent, args.latent, record_trace=False)
    runner = model if backend is None else torch.compile(model, backend=backend)
    generator = torch.Generator().manual_seed(0)
    text_dim = model.config.text_dim
    prompts = [
        PromptConditioning.of(attachment, torch.randn(1, 16, text_dim, generator=generator))
        for _ in range(2)
    ]
    frames = args.chunks * FRAMES_PER_CHUNK
    shape = (1, model.config.in_channels, frames, args.latent, args.latent)
    noise = torch.randn(shape, generator=generator)
    video = torch.zeros(shape)
    engine = ChunkEngine(runner, session, STEPS)
    run = StreamRun([], [], [], -1, video)
    with attachment.bind(session), torch.no_grad():
        for index in range(args.chunks):
            if run.first_full_chunk < 0 and cache_is_full(session):
                run.first_full_chunk = index
            segment = index // args.switch_every % 2
            chunk = ChunkPlan(
                index, index * FRAMES_PER_CHUNK, (index + 1) * FRAMES_PER_CHUNK, segment,
                recache=recaches(index, args.switch_every),
            )
            began = time.perf_counter()
            engine.step(chunk, prompts[segment], noise, video)
            run.seconds.append(time.perf_counter() - began)
            if backend is not None:
                run.graphs.append(backend.graphs)
                run.calls.append(backend.calls)
    return run


@dataclass
class Summary:
    backend: str
    layout: str
    chunks: int
    first_full_chunk: int
    graphs_while_filling: int
    graphs_at_first_recache: int
    graphs_after_warm_up: int
    chunks_not_fully_compiled: list[int]
    max_abs_difference: float
    eager_seconds_per_chunk: float
    compiled_seconds_per_chunk: float

    @property
    def speedup(self) -> float:
        return self.eager_seconds_per_chunk / self.compiled_seconds_per_chunk


def summarise(args: argparse.Namespace, eager: StreamRun, compiled: StreamRun) -> Summary:
    full, switch = compiled.first_full_chunk, args.switch_every
    new = [b - a for a, b in zip([0, *compiled.graphs[:-1]], compiled.graphs, strict=True)]
    calls = [b - a for a, b in zip([0, *compiled.calls[:-1]], compiled.calls, strict=True)]
    passes = len(STEPS.timesteps) + 1  # the denoising steps and the context pass
    first_recache = next((i for i in range(full, args.chunks) if recaches(i, switch)), None)
    half = args.chunks // 2
    return Summary(
        backend=args.backend,
        layout=args.layout,
        chunks=args.chunks,
        first_full_chunk=full,
        graphs_while_filling=sum(new[:full]),
        graphs_at_first_recache=0 if first_recache is None else new[first_recache],
        graphs_after_warm_up=sum(n for i, n in enumerate(new[full:], full) if i != first_recache),
        chunks_not_fully_compiled=[
            i for i, n in enumerate(calls) if n != passes + recaches(i, switch)
        ],
        max_abs_difference=(compiled.latents - eager.latents).abs().max().item(),
        eager_seconds_per_chunk=statistics.median(eager.seconds[half:]),
        compiled_seconds_per_chunk=statistics.median(compiled.seconds[half:]),
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("inductor", "aot_eager"), default="inductor")
    parser.add_argument("--layout", default="reference_sma", choices=list(PRESETS))
    parser.add_argument("--chunks", type=int, default=30)
    parser.add_argument("--switch-every", type=int, default=10)
    parser.add_argument("--latent", type=int, default=8, help="latent height and width")
    parser.add_argument("--layers", type=int, default=4,
                        help="transformer blocks of the tiny Wan (compile time grows with them)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the summary here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Summary:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    eager = run_stream(args, None)
    compiled = run_stream(args, CountingBackend(compiler_named(args.backend)))
    summary = summarise(args, eager, compiled)
    print(f"torch.compile(backend={args.backend}) on the tiny Wan ({args.layers} blocks), "
          f"{args.layout}, {args.chunks} chunks, a prompt switch every {args.switch_every}")
    print(f"graphs compiled: {summary.graphs_while_filling} while the cache fills (chunks "
          f"0..{summary.first_full_chunk - 1}), {summary.graphs_at_first_recache} at the first "
          f"recache, {summary.graphs_after_warm_up} after")
    print(f"chunks with a pass run eagerly: {summary.chunks_not_fully_compiled or 'none'}")
    print(f"largest |compiled - eager| of the latents: {summary.max_abs_difference:.2e}")
    print(f"seconds per chunk (median, chunks {args.chunks // 2}..): eager "
          f"{summary.eager_seconds_per_chunk:.4f}, compiled "
          f"{summary.compiled_seconds_per_chunk:.4f}, speed-up {summary.speedup:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({**asdict(summary), "speedup": summary.speedup}, file, indent=2)
    return summary


if __name__ == "__main__":
    main()
