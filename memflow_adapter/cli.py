"""The ``memflow`` command: ``demo`` (no download), ``generate`` (real weights), ``convert``, and
``eval`` (the multi-prompt long-video benchmark)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import PRESETS, MemFlowConfig
from .eval.cli import add_eval_parser
from .frame_buffer import CACHE_DTYPES
from .pipeline import MemFlowStreamingPipeline, PromptSchedule
from .world.demo import WORLD_DEMO_MODEL, WORLD_DEMO_SCRIPT, WORLD_OTHER_MODEL, run_world_demo

DEMO_PROMPTS = (
    "a red fox walks through a snowy forest",
    "a small boat sails on a blue lake at sunset",
    "the red fox walks back into the snowy forest",
)


def _demo(args: argparse.Namespace) -> int:
    sizes = {"--height": args.height, "--width": args.width,
             "--max-sequence-length": args.max_sequence_length}
    if args.model == "world":
        fixed = [name for name, value in sizes.items() if value is not None]
        if fixed:
            raise SystemExit(f"memflow demo: {', '.join(fixed)} apply to --model tiny-random; "
                             "the world model's frames are 32x32 with 16-token prompts")
        if args.chunks is not None:
            raise SystemExit("memflow demo: --chunks applies to --model tiny-random; a world "
                             "story has 12 chunks")
        if args.interactive:
            raise SystemExit("memflow demo: --interactive applies to --model tiny-random; a "
                             "world story's prompts are its script's")
        script = WORLD_DEMO_SCRIPT if args.script is None else args.script
        seed = script if args.seed is None else args.seed
        try:
            model = Path(args.world_model) if args.world_model else WORLD_DEMO_MODEL
            return run_world_demo(model, args.config, script, seed, Path(args.output_dir),
                                  args.fps, args.guidance_scale, args.cache_dtype)
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(f"memflow demo: {error}") from error
    world_only = {"--world-model": args.world_model, "--script": args.script,
                  "--guidance-scale": args.guidance_scale}
    given = [name for name, value in world_only.items() if value is not None]
    if given:
        raise SystemExit(f"memflow demo: {', '.join(given)} apply to --model world")
    return _random_tiny_demo(args)


def _random_tiny_demo(args: argparse.Namespace) -> int:
    from .tiny_wan import build_tiny_wan_pipeline

    args.height, args.width = args.height or 64, args.width or 64
    args.max_sequence_length = args.max_sequence_length or 32
    args.chunks = 9 if args.chunks is None else args.chunks
    args.seed = 0 if args.seed is None else args.seed

    print(
        "memflow demo: a tiny Wan2.1-architecture transformer, VAE and text encoder with RANDOM "
        "weights (nothing is downloaded). The video is noise-like by design: the demo shows the "
        "streaming memory at work, not image quality."
    )
    config = MemFlowConfig.preset(args.config, cache_dtype=args.cache_dtype)
    streaming = MemFlowStreamingPipeline(
        build_tiny_wan_pipeline(seed=args.seed), config, device="cpu"
    )
    if args.chunks < 1:
        raise SystemExit(f"memflow demo: --chunks must be >= 1, got {args.chunks}")
    prompts = DEMO_PROMPTS[: args.chunks]  # every prompt gets at least one chunk
    chunks_per_prompt = args.chunks // len(prompts)
    return _generate_and_write(
        streaming,
        PromptSchedule.from_prompts(prompts, chunks_per_prompt * config.frames_per_chunk),
        args,
        num_latent_frames=args.chunks * config.frames_per_chunk,
        extra={"model": "tiny random-weight Wan (embedded)", "random_weights": True},
    )


def _generate(args: argparse.Namespace) -> int:
    config = MemFlowConfig.preset(args.config, cache_dtype=args.cache_dtype)
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.ulysses_degree != 1:
        _join_context_parallel_launch(args)
    streaming = MemFlowStreamingPipeline.from_pretrained(
        args.model, config, device=args.device, dtype=dtype, ulysses_degree=args.ulysses_degree
    )
    try:
        return _generate_and_write(
            streaming,
            PromptSchedule.from_prompts(args.prompt, args.frames_per_prompt),
            args,
            num_latent_frames=args.num_latent_frames,
            extra={"model": args.model, "random_weights": False,
                   "ulysses_degree": args.ulysses_degree},
            guidance={"guidance_scale": args.guidance_scale,
                      "negative_prompt": args.negative_prompt},
        )
    finally:
        if args.ulysses_degree != 1:
            torch.distributed.destroy_process_group()


def _join_context_parallel_launch(args: argparse.Namespace) -> None:
    """Join the ``torchrun`` launch ``--ulysses-degree`` splits every pass over (NCCL on CUDA,
    gloo on the CPU)."""
    degree = args.ulysses_degree
    if args.interactive:
        raise ValueError("--interactive reads prompts on one process; it cannot drive the "
                         f"{degree} ranks of --ulysses-degree {degree}")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != degree:
        raise ValueError(
            f"--ulysses-degree {degree} needs a launch of {degree} processes, got {launched}: "
            f"torchrun --nproc_per_node {degree} -m memflow_adapter.cli generate ..."
        )
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _convert(args: argparse.Namespace) -> int:
    """Original-layout checkpoints -> a diffusers transformer folder and an adapter folder."""
    from .hub import MemFlowAdapter, PublishedLayout
    from .integrations.wan_checkpoints import (
        load_checkpoint_file,
        load_original_transformer,
        original_lora_to_diffusers,
    )

    layout = PublishedLayout()
    base_config = args.base_config or layout.base_config
    output = Path(args.output)
    transformer = load_original_transformer(args.base, base_config, entry=args.entry)
    transformer.save_pretrained(output / "transformer")
    lora = original_lora_to_diffusers(load_checkpoint_file(args.lora)) if args.lora else None
    adapter = MemFlowAdapter.for_model(
        transformer, MemFlowConfig.preset(args.config), args.base_model or layout.base_model,
        lora_state=lora, lora_alpha=args.lora_alpha,
    )
    adapter.save_pretrained(output / "adapter")
    print(f"transformer: {output / 'transformer'}\nadapter: {output / 'adapter'}")
    return 0


def _generate_and_write(
    streaming: MemFlowStreamingPipeline,
    schedule: PromptSchedule,
    args: argparse.Namespace,
    num_latent_frames: int,
    extra: dict,
    guidance: dict[str, Any] | None = None,
) -> int:
    """Stream the video into ``video.mp4`` chunk by chunk (with ``--interactive``, taking the
    prompts typed on stdin from the next chunk on), then write the timeline and the report;
    ``guidance`` (the pipeline's ``guidance_scale`` and ``negative_prompt``) goes to the pipeline
    and into report.json."""
    from .live import LivePrompts, play
    from .outputs import write_outputs

    guidance = guidance or {}
    options = {
        "num_latent_frames": num_latent_frames,
        "height": args.height,
        "width": args.width,
        "generator": torch.Generator(device=streaming.device).manual_seed(args.seed),
        "max_sequence_length": args.max_sequence_length,
        "fps": args.fps,
        **guidance,
    }
    if streaming.ulysses_degree != 1 and torch.distributed.get_rank() != 0:
        # a context-parallel rank computes its share of every pass; rank 0 writes the video
        streaming.stream(schedule, output_type="latent", **options).collect()
        return 0
    stream = streaming.stream(schedule, **options)
    live = None
    if args.interactive:
        live = LivePrompts(sys.stdin)
        print("memflow: type a prompt and Enter to switch from the next chunk on", flush=True)
    video = Path(args.output_dir) / "video.mp4"
    result = play(stream, video, args.fps, sys.stdout, live)
    paths = write_outputs(
        result,
        streaming.config,
        args.output_dir,
        args.fps,
        {**extra, **guidance, "prompts": [list(entry) for entry in stream.schedule.entries]},
        video=video,
    )
    seconds = [chunk.seconds for chunk in result.chunks]
    print(f"{len(seconds)} chunks, {sum(seconds) / len(seconds):.3f} s per chunk on average, "
          f"first frame after {result.seconds_to_first_frame:.2f} s")
    if result.denoise_fps is not None:
        ranks = "" if streaming.ulysses_degree == 1 else f" per rank of {streaming.ulysses_degree}"
        print(f"{result.denoise_fps:.2f} FPS denoising, {result.end_to_end_fps:.2f} FPS with VAE "
              f"decoding, on {result.hardware}; cache "
              f"{result.chunks[-1].cache_bytes / 2**20:.1f} MiB{ranks}")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _add_common(
    parser: argparse.ArgumentParser,
    *,
    height: int | None,
    width: int | None,
    seq: int | None,
    seed: int | None = 0,
    seed_help: str = "generation seed (default: 0)",
) -> None:
    parser.add_argument(
        "--config", choices=PRESETS, default="reference", help="memory preset (default: reference)"
    )
    parser.add_argument(
        "--cache-dtype", choices=sorted(CACHE_DTYPES), default=None,
        help="store the KV cache quantized, one scale per frame and head (default: the model "
        "dtype, exactly as computed)",
    )
    parser.add_argument("--output-dir", default="outputs", help="where to write (default: outputs)")
    parser.add_argument("--height", type=int, default=height, help="video height in pixels")
    parser.add_argument("--width", type=int, default=width, help="video width in pixels")
    parser.add_argument("--seed", type=int, default=seed, help=seed_help)
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument(
        "--max-sequence-length", type=int, default=seq, help="text tokens per prompt"
    )
    parser.add_argument(
        "--interactive", action="store_true",
        help="read prompts from stdin while streaming: each line typed switches the prompt from "
        "the next chunk on (with the KV recache)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memflow", description="Long-term memory for streaming video diffusion models."
    )
    parser.add_argument("--version", action="version", version=f"memflow-adapter {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="stream a 6-prompt narrative-world story with a returning entity with the packaged "
        "trained world model (offline), or a 3-prompt video with a tiny random-weight Wan "
        "(--model tiny-random)",
    )
    _add_common(demo, height=None, width=None, seq=None, seed=None,
                seed_help="world: the noise seed (default: the story's, as in "
                "bench/narrative_eval.py); tiny-random: the weights' and noise's (default: 0)")
    demo.add_argument("--model", choices=("world", "tiny-random"), default="world",
                      help="world: the trained narrative-world model (default); tiny-random: "
                      "random weights, plumbing only")
    demo.add_argument("--world-model",
                      help="world: a trained world transformer folder (default: the better "
                      f"packaged one, {WORLD_DEMO_MODEL.name}/; the other is "
                      f"{WORLD_OTHER_MODEL.name}/)")
    demo.add_argument(
        "--script", type=int,
        help=f"world: the held-out story's seed, 0..999 (default: {WORLD_DEMO_SCRIPT})",
    )
    demo.add_argument(
        "--guidance-scale", type=float,
        help="world: classifier-free guidance (default: the model's own, its sampling.json; "
        "1 disables it)",
    )
    demo.add_argument("--chunks", type=int,
                      help="tiny-random: chunks to generate (default: 9)")
    demo.set_defaults(handler=_demo)

    generate = commands.add_parser(
        "generate", help="stream a multi-prompt video with a diffusers Wan model (Hub id or folder)"
    )
    _add_common(generate, height=480, width=832, seq=512)
    generate.add_argument("--model", required=True, help="diffusers pipeline: Hub id or folder")
    generate.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="a prompt; repeat for a multi-prompt schedule",
    )
    generate.add_argument(
        "--frames-per-prompt",
        type=int,
        default=40,
        help="latent frames per prompt (default: 40, i.e. 10 s at 16 fps)",
    )
    generate.add_argument("--num-latent-frames", type=int, default=120)
    generate.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    generate.add_argument(
        "--ulysses-degree", type=int, default=1,
        help="split every pass over N processes with diffusers' Ulysses context parallelism, "
        "each caching 1/N of the heads; launch with torchrun --nproc_per_node N -m "
        "memflow_adapter.cli generate ... (default: 1)",
    )
    generate.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    generate.add_argument(
        "--guidance-scale", type=float, default=1.0,
        help="classifier-free guidance; 1 (default) for distilled streaming checkpoints",
    )
    generate.add_argument(
        "--negative-prompt", default=None,
        help="guidance's negative prompt (default: a zero embedding, what memory_finetune's "
        "data.prompt_dropout trains; \"\" for diffusers' Wan base models)",
    )
    generate.set_defaults(handler=_generate)

    convert = commands.add_parser(
        "convert", help="original-layout Wan checkpoints -> diffusers transformer + adapter"
    )
    convert.add_argument("--base", required=True, help="base checkpoint (.pt / .safetensors)")
    convert.add_argument("--lora", help="LoRA checkpoint in the original layout (e.g. lora.pt)")
    convert.add_argument("--entry", help="checkpoint entry (default: generator_ema, generator)")
    convert.add_argument("--base-config", help="transformer config.json or folder "
                         "(default: Wan2.1-T2V-1.3B)")
    convert.add_argument("--base-model", help="Hub id the adapter names as its base")
    convert.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    convert.add_argument("--config", choices=PRESETS, default="reference")
    convert.add_argument("--output", required=True, help="writes transformer/ and adapter/ here")
    convert.set_defaults(handler=_convert)

    add_eval_parser(commands)
    return parser


#: Errors of bad input (files, arguments, configs, missing extras): one line, exit status 2.
USER_ERRORS = (ValueError, OSError, ImportError, KeyError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``memflow`` command; bad input is reported in one line on stderr (exit status 2)
    instead of a traceback (set ``MEMFLOW_TRACEBACK=1`` to get the traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as error:
        if os.environ.get("MEMFLOW_TRACEBACK"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"memflow {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
