"""The ``memflow`` command: ``demo`` (no download), ``generate`` (real weights, or the embedded
``tiny-random`` Wan offline), ``live`` (a web page that plays the stream as it is made),
``convert``, and ``eval`` (the multi-prompt long-video benchmark).

Building the parser imports neither torch, diffusers nor the world (``memflow --help`` answers at
once): each handler imports what it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memflow_adapter.version import __version__
from memflow_apps.shared.cli_choices import (
    CACHE_DTYPES,
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    DEFAULT_MEMORIES,
    PRESETS,
    REFERENCE_BASE_MODEL,
    TINY_RANDOM,
    WORLD_DEMO_MODEL_NAME,
    WORLD_OTHER_MODEL_NAME,
)

if TYPE_CHECKING:
    from memflow_adapter.pipeline import MemFlowStreamingPipeline, PromptSchedule

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
            raise SystemExit(f"memflow demo: {', '.join(fixed)} apply to --model {TINY_RANDOM}; "
                             "the world model's frames are 32x32 with 16-token prompts")
        if args.chunks is not None:
            raise SystemExit(f"memflow demo: --chunks applies to --model {TINY_RANDOM}; a world "
                             "story has 12 chunks")
        if args.interactive:
            raise SystemExit(f"memflow demo: --interactive applies to --model {TINY_RANDOM}; a "
                             "world story's prompts are its script's")
        from memflow_apps.world.demo import WORLD_DEMO_MODEL, run_world_demo

        try:
            model = Path(args.world_model) if args.world_model else WORLD_DEMO_MODEL
            return run_world_demo(model, args.config, args.script, args.seed,
                                  Path(args.output_dir), args.fps, args.guidance_scale,
                                  args.cache_dtype)
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(f"memflow demo: {error}") from error
    world_only = {"--world-model": args.world_model, "--script": args.script,
                  "--guidance-scale": args.guidance_scale}
    given = [name for name, value in world_only.items() if value is not None]
    if given:
        raise SystemExit(f"memflow demo: {', '.join(given)} apply to --model world")
    return _random_tiny_demo(args)


def _random_tiny_demo(args: argparse.Namespace) -> int:
    from memflow_adapter.config import MemFlowConfig
    from memflow_adapter.pipeline import MemFlowStreamingPipeline, PromptSchedule
    from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

    for name, default in _TINY_SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
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


#: ``memflow generate``'s sizes (height, width, text tokens) when not given for the tiny
#: random-weight model (which streams them in a fraction of a second per chunk on a CPU); a real
#: model gets its family's (``Integration.default_video``).
_TINY_SIZES = {"height": 64, "width": 64, "max_sequence_length": 32}
_DEFAULT_FRAMES_PER_PROMPT = 40


def _compare(args: argparse.Namespace) -> int:
    """``memflow compare``: the world's or the prompt groups' comparison, each its own
    application's (imported here, the command's dispatch)."""
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.prompts is None:
        from memflow_apps.world.compare import run_command
    else:
        from memflow_apps.eval.compare import run_command
    return run_command(args)


def _generate(args: argparse.Namespace) -> int:
    import torch

    from memflow_adapter.pipeline import PromptSchedule

    from .live import read_prompt_file

    tiny = args.model == TINY_RANDOM
    if args.prompt_file is not None:
        if args.frames_per_prompt is not None:
            raise ValueError("--frames-per-prompt spaces the --prompt prompts; --prompt-file "
                             f"{args.prompt_file} gives each prompt its own latent frame")
        schedule = read_prompt_file(args.prompt_file, args.num_latent_frames)
    else:
        schedule = PromptSchedule.from_prompts(
            args.prompt, args.frames_per_prompt or _DEFAULT_FRAMES_PER_PROMPT
        )
    if args.ulysses_degree != 1:
        _join_context_parallel_launch(args)
    streaming = _streaming_pipeline(args)
    try:
        return _generate_and_write(
            streaming,
            schedule,
            args,
            num_latent_frames=args.num_latent_frames,
            extra={"model": args.model, "random_weights": tiny,
                   "ulysses_degree": args.ulysses_degree},
            guidance={"guidance_scale": args.guidance_scale,
                      "negative_prompt": args.negative_prompt},
        )
    finally:
        if args.ulysses_degree != 1:
            torch.distributed.destroy_process_group()


def _streaming_pipeline(args: argparse.Namespace) -> MemFlowStreamingPipeline:
    """The model ``--model`` names (``tiny-random``: the embedded random-weight one) with the
    ``--config`` preset, on ``--device`` in ``--dtype``; the ``--height``, ``--width`` and
    ``--max-sequence-length`` not given are set to the model family's (``memflow generate`` and
    ``memflow live``)."""
    import torch

    from integrations import find_integration
    from memflow_adapter.config import MemFlowConfig
    from memflow_adapter.pipeline import MemFlowStreamingPipeline

    tiny = args.model == TINY_RANDOM
    config = MemFlowConfig.preset(args.config, cache_dtype=args.cache_dtype)
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    degree = getattr(args, "ulysses_degree", 1)
    if tiny:
        from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

        pipe = build_tiny_wan_pipeline(seed=0)  # the weights memflow eval's tiny-random has
        streaming = MemFlowStreamingPipeline(
            pipe if dtype is None else pipe.to(dtype=dtype), config, device=args.device,
            ulysses_degree=degree,
        )
    else:
        streaming = MemFlowStreamingPipeline.from_pretrained(
            args.model, config, device=args.device, dtype=dtype, ulysses_degree=degree,
        )
    video = find_integration(streaming.transformer).default_video
    model_sizes = {"height": video.height, "width": video.width,
                   "max_sequence_length": video.max_sequence_length}
    for name, default in (_TINY_SIZES if tiny else model_sizes).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return streaming


#: ``memflow live``'s default model: the narrative world's student.
WORLD = "world"


def _live(args: argparse.Namespace) -> int:
    """Serve the live page (``memflow_apps.live``) until Ctrl-C."""
    from memflow_apps.live.server import check_host, create_app, serve
    from memflow_apps.live.session import LiveSettings

    allowed_hosts = check_host(args.host, args.expose)
    if args.model == WORLD:
        fixed = [name for name, value in (("--height", args.height), ("--width", args.width),
                 ("--max-sequence-length", args.max_sequence_length)) if value is not None]
        if fixed:
            raise ValueError(f"{', '.join(fixed)} apply to models other than --model {WORLD}; "
                             "the world's frames are 32x32 with 16-token prompts")
        from memflow_apps.world.demo import WORLD_LIVE_MODEL, live_world

        world = live_world(args.config, args.cache_dtype)
        streaming, prompts = world.streaming, world.prompts
        args.height, args.width = world.height, world.width
        args.max_sequence_length = world.max_sequence_length
        guidance = world.guidance_scale if args.guidance_scale is None else args.guidance_scale
        name = f"narrative world student ({WORLD_LIVE_MODEL})"
    else:
        streaming, prompts = _streaming_pipeline(args), DEMO_PROMPTS
        guidance = 1.0 if args.guidance_scale is None else args.guidance_scale
        name = args.model
    settings = LiveSettings(
        model=name, prompt=prompts[0] if args.prompt is None else args.prompt,
        height=args.height, width=args.width, max_sequence_length=args.max_sequence_length,
        num_latent_frames=args.num_latent_frames, seed=args.seed, fps=args.fps,
        guidance_scale=guidance, negative_prompt=args.negative_prompt,
        output_dir=Path(args.output_dir), suggestions=tuple(prompts),
        report={"random_weights": args.model == TINY_RANDOM},
    )
    app = create_app(streaming, settings, allowed_hosts)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"memflow live: {name}, memory {streaming.config.describe()}, on "
          f"{streaming.device}; open http://{host}:{args.port}/ (Ctrl-C stops)", flush=True)
    serve(app, args.host, args.port)
    return 0


def _join_context_parallel_launch(args: argparse.Namespace) -> None:
    """Join the ``torchrun`` launch ``--ulysses-degree`` splits every pass over (NCCL on CUDA,
    gloo on the CPU)."""
    import torch

    degree = args.ulysses_degree
    if args.interactive:
        raise ValueError("--interactive reads prompts on one process; it cannot drive the "
                         f"{degree} ranks of --ulysses-degree {degree}")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != degree:
        raise ValueError(
            f"--ulysses-degree {degree} needs a launch of {degree} processes, got {launched}: "
            f"torchrun --nproc_per_node {degree} -m memflow_apps.cli generate ..."
        )
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _convert(args: argparse.Namespace) -> int:
    """Original-layout checkpoints -> a diffusers transformer folder and an adapter folder.

    Everything is read and checked first (the output folder, the base checkpoint against its
    config, the LoRA against the transformer); then both folders are written into a staging
    folder beside ``--output`` and moved into place, so a failure leaves nothing half-written."""
    import math
    import shutil
    import tempfile

    from integrations import integration_for_config, reference_integration
    from integrations.checkpoints import (
        load_checkpoint_file,
        lora_config_for,
        read_config,
        validate_lora,
    )
    from memflow_adapter.config import MemFlowConfig
    from memflow_adapter.hub import MemFlowAdapter, chmod_as_umask

    output = Path(args.output)
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise ValueError(f"--output {output} already exists and is not an empty folder; "
                         "expected a new (or empty) folder to write transformer/ and adapter/ into")
    if args.lora_alpha is not None:
        if args.lora is None:
            raise ValueError(f"--lora-alpha {args.lora_alpha} scales --lora, which is not given")
        if not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
            raise ValueError(f"--lora-alpha must be a finite number > 0, got {args.lora_alpha}")
    # the config's class names the family whose original layout the checkpoints are in
    config = None if args.base_config is None else read_config(args.base_config)
    family = reference_integration() if config is None else integration_for_config(config)
    conversion = family.checkpoint_conversion()
    # the default config is the one of the base the family's published checkpoints fine-tune, so
    # its Hub id is known; another one's is not
    base_model = args.base_model or (conversion.base_model if config is None else None)
    transformer = conversion.load_transformer(
        args.base, conversion.base_config if config is None else config, entry=args.entry
    )
    lora = None
    if args.lora is not None:
        lora = conversion.lora_to_diffusers(load_checkpoint_file(args.lora))
        try:
            lora_config_for(lora, args.lora_alpha)
            validate_lora(transformer, lora)
        except ValueError as error:
            raise ValueError(
                f"--lora {args.lora} does not fit --base {args.base}: {error}"
            ) from error
    adapter = MemFlowAdapter.for_model(
        transformer, MemFlowConfig.preset(args.config), base_model,
        lora_state=lora, lora_alpha=args.lora_alpha,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial",
                                    dir=output.parent))
    try:
        transformer.save_pretrained(staging / "transformer")
        adapter.save_pretrained(staging / "adapter")
        chmod_as_umask(staging)  # mkdtemp makes it 0700, safetensors its files 0600
        os.replace(staging, output)  # replaces an empty folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"transformer: {output / 'transformer'}\nadapter: {output / 'adapter'}")
    return 0


#: Exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


@contextlib.contextmanager
def _stop_on_ctrl_c(command: str) -> Iterator[threading.Event]:
    """An event set by the first Ctrl-C (one line on stderr: the stream stops after the chunk
    being made); a second Ctrl-C raises ``KeyboardInterrupt`` at once. Off the main thread, where
    Python delivers no signals, the event is never set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def first_then_at_once(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(f"memflow {command}: Ctrl-C: stopping after this chunk; the video, timeline and "
              "report will hold what was made (Ctrl-C again stops at once)", file=sys.stderr,
              flush=True)

    previous = signal.signal(signal.SIGINT, first_then_at_once)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _generate_and_write(
    streaming: MemFlowStreamingPipeline,
    schedule: PromptSchedule,
    args: argparse.Namespace,
    num_latent_frames: int,
    extra: dict,
    guidance: dict[str, Any] | None = None,
) -> int:
    """Stream the video into ``video.mp4`` chunk by chunk (with ``--interactive``, taking the
    prompts typed on stdin from the next chunk on, or piped ones one per chunk boundary), then
    write the timeline and the report; ``guidance`` (the pipeline's ``guidance_scale`` and
    ``negative_prompt``) goes to the pipeline and into report.json. A first Ctrl-C stops after
    the chunk being made: the outputs hold the chunks made, and the exit status is 130."""
    import torch

    from memflow_adapter.outputs import write_outputs

    from .live import LivePrompts, play

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
        piped = not sys.stdin.isatty()
        live = LivePrompts(sys.stdin, one_per_boundary=piped)
        print("memflow: piped prompts apply one line per chunk boundary, from the second chunk on"
              if piped else "memflow: type a prompt and Enter to switch from the next chunk on",
              flush=True)
    video = Path(args.output_dir) / "video.mp4"
    with _stop_on_ctrl_c(args.command) as stop:
        result = play(stream, video, args.fps, sys.stdout, live, stop)
    if live is not None and live.unused():
        print(f"memflow: {live.unused()} piped prompt(s) not used: the video ended first",
              flush=True)
    interrupted = stream.next_chunk is not None
    paths = write_outputs(
        result,
        streaming.config,
        args.output_dir,
        args.fps,
        {**extra, **guidance, "prompts": [list(entry) for entry in stream.schedule.entries],
         "interrupted": interrupted, "planned_chunks": stream.num_chunks},
        video=video,
    )
    seconds = [chunk.seconds for chunk in result.chunks]
    stopped = f" of {stream.num_chunks} (stopped by Ctrl-C)" if interrupted else ""
    print(f"{len(seconds)} chunks{stopped}, {sum(seconds) / len(seconds):.3f} s per chunk on "
          f"average, first frame after {result.seconds_to_first_frame:.2f} s")
    if result.denoise_fps is not None:
        ranks = "" if streaming.ulysses_degree == 1 else f" per rank of {streaming.ulysses_degree}"
        print(f"{result.denoise_fps:.2f} FPS denoising, {result.end_to_end_fps:.2f} FPS with VAE "
              f"decoding, on {result.hardware}; cache "
              f"{result.chunks[-1].cache_bytes / 2**20:.1f} MiB{ranks}")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return INTERRUPTED if interrupted else 0


def _add_common(
    parser: argparse.ArgumentParser,
    *,
    real_models: bool,
    seed: int | None = 0,
    seed_help: str = "generation seed (default: 0)",
    config: str = "reference",
    output_dir: str = "outputs",
    interactive: bool = True,
) -> None:
    """The options ``demo``, ``generate`` and ``live`` share; ``real_models``: the command also
    streams real models, sized by their family when not told (else only the tiny random-weight
    one); ``config`` and ``output_dir``: the defaults; ``interactive``: offer ``--interactive``."""

    def sizes(name: str) -> str:
        tiny = _TINY_SIZES[name]
        if not real_models:
            return f" ({TINY_RANDOM} only; default: {tiny})"
        return f" (default: the model family's; {TINY_RANDOM}: {tiny})"

    parser.add_argument(
        "--config", choices=PRESETS, default=config, help=f"memory preset (default: {config})"
    )
    parser.add_argument(
        "--cache-dtype", choices=sorted(CACHE_DTYPES), default=None,
        help="store the KV cache quantized, one scale per frame and head (default: the model "
        "dtype, exactly as computed)",
    )
    parser.add_argument("--output-dir", default=output_dir,
                        help=f"where to write (default: {output_dir})")
    parser.add_argument("--height", type=int, help=f"video height in pixels{sizes('height')}")
    parser.add_argument("--width", type=int, help=f"video width in pixels{sizes('width')}")
    parser.add_argument("--seed", type=int, default=seed, help=seed_help)
    parser.add_argument(
        "--fps", type=int, default=16, help="frames per second of the mp4 (default: 16)"
    )
    parser.add_argument(
        "--max-sequence-length", type=int,
        help=f"text tokens per prompt{sizes('max_sequence_length')}",
    )
    if not interactive:
        return
    parser.add_argument(
        "--interactive", action="store_true",
        help="read prompts from stdin while streaming: each line typed switches the prompt from "
        "the next chunk on (with the KV recache); piped lines apply one per chunk boundary",
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
    _add_common(demo, real_models=False, seed=None,
                seed_help="world: the noise seed (default: the story's, as in "
                "bench/narrative_eval.py); tiny-random: the weights' and noise's (default: 0)")
    demo.add_argument("--model", choices=("world", "tiny-random"), default="world",
                      help="world: the trained narrative-world model (default); tiny-random: "
                      "random weights, plumbing only")
    demo.add_argument("--world-model",
                      help="world: a trained world transformer folder (default: the better "
                      f"packaged one, {WORLD_DEMO_MODEL_NAME}/; the other is "
                      f"{WORLD_OTHER_MODEL_NAME}/)")
    demo.add_argument(
        "--script", type=int,
        help="world: the held-out story's seed, 0..999 (default: the first story of the "
        "model's held-out benchmark, its heldout.json)",
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
        "generate",
        help="stream a multi-prompt video with a diffusers model of a supported family (Hub id "
        "or folder)",
    )
    _add_common(generate, real_models=True)
    generate.add_argument(
        "--model", required=True,
        help=f"diffusers pipeline: Hub id or folder; '{TINY_RANDOM}': the embedded tiny model "
        "with random weights (offline, noise-like video: plumbing only)",
    )
    prompts = generate.add_mutually_exclusive_group(required=True)
    prompts.add_argument(
        "--prompt",
        action="append",
        help="a prompt; repeat for a multi-prompt schedule",
    )
    prompts.add_argument(
        "--prompt-file", metavar="FILE",
        help="timed prompts, one a line: '<latent frame> <prompt>' (e.g. '0 a red fox', '40 a "
        "boat'), or JSONL {\"frame\": N, \"prompt\": \"...\"}; the first starts at frame 0",
    )
    generate.add_argument(
        "--frames-per-prompt",
        type=int,
        help=f"--prompt: latent frames per prompt (default: {_DEFAULT_FRAMES_PER_PROMPT}, i.e. "
        "10 s at 16 fps)",
    )
    generate.add_argument(
        "--num-latent-frames", type=int, default=120,
        help="length of the video in latent frames, 4 video frames each (default: 120)",
    )
    generate.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    generate.add_argument(
        "--ulysses-degree", type=int, default=1,
        help="split every pass over N processes with diffusers' Ulysses context parallelism, "
        "each caching 1/N of the heads; launch with torchrun --nproc_per_node N -m "
        "memflow_apps.cli generate ... (default: 1)",
    )
    generate.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
        help="weights' dtype (default: auto, bfloat16 on CUDA and float32 on the CPU)",
    )
    generate.add_argument(
        "--guidance-scale", type=float, default=1.0,
        help="classifier-free guidance; 1 (default) for distilled streaming checkpoints",
    )
    generate.add_argument(
        "--negative-prompt", default=None,
        help="guidance's negative prompt (default: a zero embedding, what memory_finetune's "
        "data.prompt_dropout trains; \"\" for diffusers' text-to-video base models)",
    )
    generate.set_defaults(handler=_generate)

    live = commands.add_parser(
        "live",
        help="a local web page that streams a video as it is made, takes prompts while it plays "
        "and shows what the memory holds (extra: live)",
    )
    _add_common(live, real_models=True, config="reference_sma", output_dir="outputs/live",
                interactive=False)
    live.add_argument(
        "--model", default=WORLD,
        help=f"'{WORLD}' (default): the narrative world's packaged distilled student (offline); "
        f"'{TINY_RANDOM}': the embedded random-weight tiny model; or a diffusers pipeline, as "
        "for memflow generate (Hub id or folder)",
    )
    live.add_argument("--prompt", help="the prompt the video starts with (default: the world "
                      "story's first; else the demo's)")
    live.add_argument("--num-latent-frames", type=int, default=240,
                      help="length of the video in latent frames (default: 240)")
    live.add_argument("--device", default=None,
                      help="torch device (default: cuda if available, else cpu)")
    live.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                      help="weights' dtype (default: auto, bfloat16 on CUDA and float32 on "
                      "the CPU)")
    live.add_argument("--guidance-scale", type=float,
                      help="classifier-free guidance (default: the world model's own; else 1)")
    live.add_argument("--negative-prompt", default=None,
                      help="guidance's negative prompt (default: a zero embedding)")
    live.add_argument("--host", default="127.0.0.1",
                      help="address to serve on (default: 127.0.0.1, this machine only; reach a "
                      "remote one through an SSH tunnel)")
    live.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    live.add_argument("--expose", action="store_true",
                      help="allow a --host other machines can reach (there is no login: anyone "
                      "who reaches the port can generate and save)")
    live.set_defaults(handler=_live)

    convert = commands.add_parser(
        "convert", help="original-layout checkpoints (Self-Forcing, LongLive, MemFlow) -> "
        "diffusers transformer + adapter"
    )
    convert.add_argument("--base", required=True, help="base checkpoint (.pt / .safetensors)")
    convert.add_argument("--lora", help="LoRA checkpoint in the original layout (e.g. lora.pt)")
    convert.add_argument("--entry", help="checkpoint entry (default: generator_ema, generator)")
    convert.add_argument("--base-config", help="transformer config.json or folder; its "
                         "_class_name picks the model family (default: the config of "
                         f"{REFERENCE_BASE_MODEL})")
    convert.add_argument(
        "--base-model",
        help=f"Hub id the adapter names as its base (default: {REFERENCE_BASE_MODEL} with the "
        "default --base-config; with another, none: recorded as null)",
    )
    convert.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    convert.add_argument(
        "--config", choices=PRESETS, default="reference",
        help="memory preset the adapter records (default: reference)",
    )
    convert.add_argument(
        "--output", required=True,
        help="a new (or empty) folder: transformer/ and adapter/ are written beside it, then "
        "moved into it once complete",
    )
    convert.set_defaults(handler=_convert)

    compare = commands.add_parser(
        "compare",
        help="compare memories (bank and activation policies) side by side on one base model: "
        "the narrative world's stories (default) or memflow eval's prompt groups (--prompts)",
        description="Stream the same stories under every memory with one model and write a table "
        "(comparison.md / .json / .png) of quality, the retrieval score, time per chunk and "
        "cache size. A memory is a bank policy (dense attention), '<bank>+<activation>' (SMA "
        "with that activation policy) or 'none' (sink and window only).",
    )
    compare.add_argument(
        "--memories", nargs="+", default=list(DEFAULT_MEMORIES), metavar="MEMORY",
        help=f"the memories to compare (default: {' '.join(DEFAULT_MEMORIES)})",
    )
    compare.add_argument("--output-dir", default="outputs/compare",
                         help="where comparison.md / .json / .png go (default: outputs/compare)")
    compare.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    world = compare.add_argument_group("the narrative world (without --prompts)")
    world.add_argument("--world-model",
                       help="a trained world transformer folder (default: the packaged "
                       f"{WORLD_OTHER_MODEL_NAME}/, few-step)")
    world.add_argument("--stories", type=int, default=50, help="stories (default: 50)")
    world.add_argument("--first-seed", type=int, default=700,
                       help="the stories' seeds are first .. first + stories - 1, held out "
                       "(0..999; default: 700, never used to tune anything)")
    world.add_argument("--guidance-scale", type=float,
                       help="classifier-free guidance (default: the model's own)")
    groups = compare.add_argument_group("prompt groups (with --prompts)")
    groups.add_argument("--prompts", help="prompt groups as memflow eval reads them ('sample': "
                        "the packaged four)")
    groups.add_argument("--model", default=TINY_RANDOM,
                        help=f"diffusers pipeline: Hub id or folder (default: '{TINY_RANDOM}', "
                        "random weights, plumbing only)")
    groups.add_argument("--preset", choices=PRESETS, default="reference",
                        help="the base layout whose memory is varied (default: reference)")
    groups.add_argument("--limit", type=int, help="only the first N prompt groups")
    groups.add_argument("--frames-per-prompt", type=int, default=40,
                        help="latent frames per prompt (default: 40)")
    groups.add_argument("--seed", type=int, default=0, help="group i uses seed + i")
    groups.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    groups.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL,
                        help=f"as memflow eval's (default: {DEFAULT_CLIP_MODEL}; "
                        f"'{TINY_RANDOM}' offline)")
    groups.add_argument("--dino-model", default=DEFAULT_DINO_MODEL,
                        help=f"as memflow eval's (default: {DEFAULT_DINO_MODEL}; "
                        f"'{TINY_RANDOM}' offline)")
    compare.set_defaults(handler=_compare)

    # the benchmark's own parser (a light module: its handler imports what it runs); imported
    # here, not at module top, as the one dispatch from this command into another application
    from memflow_apps.eval.cli import add_eval_parser

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
    except KeyboardInterrupt:
        print(f"memflow {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except USER_ERRORS as error:
        if os.environ.get("MEMFLOW_TRACEBACK"):
            raise
        print(f"memflow {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2


def one_line(error: BaseException) -> str:
    """``error``'s message, then each error it was raised from that adds something, on one line
    (diffusers, for one, wraps why a load failed and points to "the root cause in the stacktrace
    above", which the one-line report does not print)."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        message = current.args[0] if isinstance(current, KeyError) and current.args else current
        text = " ".join(str(message).split())
        if text and not any(text in part for part in parts):
            parts.append(text if current is error else f"{type(current).__name__}: {text}")
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    return "; caused by ".join(parts)

