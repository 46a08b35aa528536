"""Time to first frame and per-chunk time of ``stream()`` (frames decoded chunk by chunk through
the VAE's temporal cache) against generating the whole video and decoding it at the end, side by
side in one process.

Models: the embedded tiny random-weight Wan (its ``AutoencoderKLWan`` decodes causally with a
feature cache) and the packaged narrative-world model (per-frame pixel autoencoder, 10 guided
deterministic steps). Both modes run alternately, ``--repeats`` times each; each figure is the
minimum over repetitions. Printed: seconds to the first decoded frame, mean seconds per chunk
(generation + its decode), total seconds, and incremental / end-of-video ratios.

    .venv/bin/python bench/stream_latency.py          # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import time

import torch

from memflow_adapter import MemFlowConfig
from memflow_adapter.hooks import remove_memflow
from memflow_adapter.pipeline import MemFlowStreamingPipeline, PromptSchedule
from memflow_apps.cli.main import DEMO_PROMPTS
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline
from memflow_apps.world.grammar import make_script
from memflow_apps.world.pipeline import (
    WORLD_GUIDANCE_SCALE,
    WORLD_SCHEDULE,
    WORLD_SEQUENCE_LENGTH,
    load_world_pipeline,
)
from memflow_apps.world.render import HEIGHT, WIDTH
from memflow_apps.world.scoring import WORLD_LAYOUTS, script_schedule


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=12, help="tiny Wan: chunks per video")
    parser.add_argument("--size", type=int, default=128, help="tiny Wan: height = width (px)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args()


def incremental(streaming: MemFlowStreamingPipeline, kwargs: dict) -> dict[str, float]:
    """``stream()`` with frames decoded after each chunk."""
    began = time.perf_counter()
    stream = streaming.stream(**kwargs, output_type="np")
    chunks = [(chunk.report.seconds + chunk.report.decode_seconds) for chunk in stream]
    return {
        "first frame": stream.seconds_to_first_frame,
        "per chunk": sum(chunks) / len(chunks),
        "total": time.perf_counter() - began,
    }


def at_the_end(streaming: MemFlowStreamingPipeline, kwargs: dict) -> dict[str, float]:
    """Latents of every chunk first, then the whole video decoded (the old pipeline's way)."""
    began = time.perf_counter()
    result = streaming.stream(**kwargs, output_type="latent").collect()
    with torch.no_grad():
        video = streaming.attachment.integration.decode_latents(streaming.pipe.vae, result.latents)
        streaming.pipe.video_processor.postprocess_video(video, output_type="np")
    total = time.perf_counter() - began
    return {"first frame": total, "per chunk": total / len(result.chunks), "total": total}


def compare(name: str, streaming: MemFlowStreamingPipeline, kwargs: dict, repeats: int) -> None:
    runs: dict[str, list[dict[str, float]]] = {"incremental": [], "at the end": []}
    for _ in range(repeats):
        for mode, run in (("incremental", incremental), ("at the end", at_the_end)):
            kwargs["generator"] = torch.Generator().manual_seed(0)
            runs[mode].append(run(streaming, kwargs))
    best = {mode: {key: min(r[key] for r in results) for key in results[0]}
            for mode, results in runs.items()}
    print(f"\n{name}")
    print(f"{'':14}{'first frame':>14}{'per chunk':>12}{'total':>10}")
    for mode, figures in best.items():
        print(f"{mode:14}" + "".join(f"{figures[key]:>{w}.3f}" for key, w in
                                     (("first frame", 13), ("per chunk", 12), ("total", 10)))
              + "  s")
    ratio = {key: best["incremental"][key] / best["at the end"][key] for key in best["at the end"]}
    print(f"{'ratio':14}{ratio['first frame']:>13.3f}{ratio['per chunk']:>12.3f}"
          f"{ratio['total']:>10.3f}  (incremental / at the end)")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, minimum of {args.repeats} interleaved runs")

    pipe = build_tiny_wan_pipeline(seed=0)
    config = MemFlowConfig.reference()
    streaming = MemFlowStreamingPipeline(pipe, config, device="cpu")
    frames = args.chunks * config.frames_per_chunk
    prompts = DEMO_PROMPTS[: args.chunks]  # every prompt gets a chunk
    frames_per_prompt = args.chunks // len(prompts) * config.frames_per_chunk
    compare(
        f"tiny random-weight Wan, {args.size}x{args.size} px, {args.chunks} chunks of 3 latent "
        f"frames ({4 * (frames - 1) + 1} video frames), reference memory",
        streaming,
        dict(prompt=PromptSchedule.from_prompts(prompts, frames_per_prompt),
             num_latent_frames=frames, height=args.size, width=args.size,
             max_sequence_length=32),
        args.repeats,
    )
    remove_memflow(pipe.transformer)

    world = load_world_pipeline()
    script = make_script(900, world.sampling.edition)
    streaming = MemFlowStreamingPipeline(world, WORLD_LAYOUTS["reference"], WORLD_SCHEDULE,
                                         device="cpu")
    compare(
        f"narrative world (packaged model), {HEIGHT}x{WIDTH} px, story 900, "
        f"{script.num_frames // 2} chunks, guidance {WORLD_GUIDANCE_SCALE:g}",
        streaming,
        dict(prompt=script_schedule(script), num_latent_frames=script.num_frames,
             height=HEIGHT, width=WIDTH, max_sequence_length=WORLD_SEQUENCE_LENGTH,
             guidance_scale=WORLD_GUIDANCE_SCALE),
        args.repeats,
    )


if __name__ == "__main__":
    main()
