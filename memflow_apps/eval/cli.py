"""``memflow eval``: generate the multi-prompt benchmark's videos, score them, report.

Two modes::

    memflow eval --prompts groups.jsonl --model <diffusers pipeline> --config reference longlive
    memflow eval --prompts groups.jsonl --videos DIR

The first generates one video per prompt group and configuration into
``OUTPUT/videos/<config>/<group>.mp4`` (finished videos are skipped on a rerun), then scores them;
the second scores existing videos (e.g. the official code's), matched to groups by file name.
Both write ``videos.csv``, ``segments.csv``, ``summary.csv``, ``summary.md`` and
``segment_scores.png`` into ``--output-dir`` and print the summary. Without ``--model`` (or
with ``--model tiny-random``) the embedded tiny random-weight model generates: an offline smoke run
whose scores mean nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# torch, transformers and the scorers are imported by run_eval: building the parser stays light.
from memflow_apps.shared.cli_choices import (
    DEFAULT_AESTHETIC_CLIP_MODEL,
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    PRESETS,
    TINY_RANDOM,
)

__all__ = ["add_eval_parser", "run_eval"]

#: The tiny random-weight model's sizes; a real model's are the protocol's (``EvalProtocol``).
_TINY_DEFAULTS = {"height": 64, "width": 64, "max_sequence_length": 32}


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to an ``argparse`` sub-parser set; returns its parser
    (``parser.set_defaults(handler=run_eval)`` is already done)."""
    parser = subparsers.add_parser(
        "eval",
        help="multi-prompt long-video benchmark: generate (resumable), score, report",
        description="Generate the multi-prompt benchmark's videos (resumable) or take existing "
        "ones, score them (CLIP score per segment, subject/background consistency, cross-segment "
        "consistency, optional aesthetic quality) and write CSV / markdown / PNG reports.",
    )
    source = parser.add_argument_group("what to score")
    source.add_argument(
        "--prompts", required=True,
        help="prompt groups: JSONL (one {'prompts': [...]} per line), JSON, or text "
             "(' | '-separated lines or blank-line separated blocks); 'sample' for the packaged "
             "four sample groups",
    )
    source.add_argument(
        "--videos", help="score the videos in this folder (and its sub-folders, one per "
                         "configuration) instead of generating",
    )
    source.add_argument("--limit", type=int, help="only the first N prompt groups")
    source.add_argument(
        "--id-pattern", help="--videos: regex whose group 'id' (or first group) extracts the "
                             "group id or 0-based index from a video's file stem",
    )
    source.add_argument("--label", help="--videos: configuration name of the videos directly "
                                        "inside DIR (default: the folder name)")

    generation = parser.add_argument_group("generation")
    generation.add_argument(
        "--model", help=f"diffusers pipeline (Hub id or folder); '{TINY_RANDOM}' or absent: the "
                        "embedded random-weight tiny model (offline smoke run)",
    )
    generation.add_argument(
        "--config", nargs="+", action="extend", choices=PRESETS, metavar="PRESET",
        help=f"memory preset(s) to compare, among {', '.join(PRESETS)} (default: reference)",
    )
    generation.add_argument(
        "--frames-per-prompt", type=int, default=40,
        help="latent frames per prompt (default: 40 = 10 s at 16 fps)",
    )
    generation.add_argument(
        "--latent-frames", type=int,
        help="latent frames per video (default: prompts x frames-per-prompt, 240 for 6 prompts)",
    )
    generation.add_argument(
        "--height", type=int, help="pixels (default: the protocol's, the reference family's; "
        "tiny-random: 64)"
    )
    generation.add_argument(
        "--width", type=int, help="pixels (default: the protocol's, the reference family's; "
        "tiny-random: 64)"
    )
    generation.add_argument(
        "--fps", type=int, default=16, help="frames per second of the videos (default: 16)"
    )
    generation.add_argument("--seed", type=int, default=0, help="group i uses seed + i")
    generation.add_argument(
        "--max-sequence-length", type=int,
        help="text tokens per prompt (default: the reference family's; tiny-random: 32)",
    )
    generation.add_argument(
        "--device", help="torch device to generate and score on (default: cuda if available, "
        "else cpu)"
    )
    generation.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
        help="weights' dtype (default: auto, bfloat16 on CUDA and float32 on the CPU)",
    )
    generation.add_argument(
        "--no-score", action="store_true", help="generate only (score later with --videos)"
    )

    scoring = parser.add_argument_group("scoring")
    scoring.add_argument(
        "--clip-model", default=DEFAULT_CLIP_MODEL,
        help=f"CLIP for the CLIP score and background consistency: a Hub id or a folder "
             f"(default: {DEFAULT_CLIP_MODEL}); '{TINY_RANDOM}' for a tiny random one (offline "
             "smoke runs; scores mean nothing)",
    )
    scoring.add_argument(
        "--dino-model", default=DEFAULT_DINO_MODEL,
        help=f"DINO for subject consistency: a Hub id or a folder (default: "
             f"{DEFAULT_DINO_MODEL}); '{TINY_RANDOM}' for a tiny random one",
    )
    scoring.add_argument(
        "--aesthetic-head", help="LAION aesthetic head state dict (.pth); without it aesthetic "
                                 "quality is reported as absent",
    )
    scoring.add_argument(
        "--aesthetic-clip-model", default=DEFAULT_AESTHETIC_CLIP_MODEL,
        help=f"CLIP model of the aesthetic head (default: {DEFAULT_AESTHETIC_CLIP_MODEL})",
    )
    scoring.add_argument(
        "--boundary-frames", type=int, default=16,
        help="frames each side of a prompt switch for cross-segment consistency (default: 16)",
    )
    scoring.add_argument(
        "--frames-per-chunk", type=int, default=3,
        help="--videos: the generator's chunk size, to place prompt switches (default: 3)",
    )
    scoring.add_argument(
        "--batch-size", type=int, default=32, help="frames per forward pass (default: 32)"
    )
    scoring.add_argument(
        "--output-dir", default="outputs/eval",
        help="where the videos and reports go (default: outputs/eval)",
    )
    scoring.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_eval)
    return parser


def run_eval(args: argparse.Namespace) -> int:
    """The ``memflow eval`` handler: 0 when at least one video was scored (or generation
    only), 1 when none could be, 2 on bad input."""
    from memflow_apps.shared.prompts import PromptFileError, load_prompt_groups
    from memflow_apps.shared.tiny_scorers import SAMPLE_PROMPTS, save_tiny_clip, save_tiny_dino

    from .entries import collect_videos
    from .generation import generate_videos
    from .protocol import EvalProtocol
    from .scoring import VideoScorer, evaluate

    error = _check_arguments(args)
    if error:
        print(f"memflow eval: error: {error}", file=sys.stderr)
        return 2
    try:
        groups = load_prompt_groups(SAMPLE_PROMPTS if args.prompts == "sample" else args.prompts)
    except PromptFileError as problem:
        print(f"memflow eval: error: {problem}", file=sys.stderr)
        return 2
    if not args.no_score:
        error = _check_scorers(args)
        if error:
            print(f"memflow eval: error: {error}", file=sys.stderr)
            return 2
    groups = groups[: args.limit] if args.limit else groups
    tiny = args.videos is None and args.model in (None, TINY_RANDOM)
    sizes = {name: getattr(args, name) or (_TINY_DEFAULTS[name] if tiny else None)
             for name in _TINY_DEFAULTS}
    protocol = EvalProtocol(
        frames_per_prompt=args.frames_per_prompt,
        num_latent_frames=args.latent_frames,
        frames_per_chunk=args.frames_per_chunk,
        fps=args.fps,
        seed=args.seed,
        boundary_frames=args.boundary_frames,
        **{name: value for name, value in sizes.items() if value is not None},
    )
    progress = not args.no_progress
    try:
        if args.videos is not None:
            entries = collect_videos(args.videos, groups, args.id_pattern, args.label)
        else:
            if tiny:
                print(
                    "memflow eval: generating with the embedded tiny model, its weights RANDOM "
                    "(nothing is downloaded): an offline smoke run, the scores mean nothing.",
                    file=sys.stderr,
                )
            entries = generate_videos(
                groups,
                args.config or ["reference"],
                args.output_dir,
                protocol,
                pipe_factory(args.model, args.device, args.dtype),
                model=args.model or TINY_RANDOM,
                device=args.device or ("cpu" if tiny else None),
                progress=progress,
            )
    except (FileNotFoundError, ValueError) as problem:
        print(f"memflow eval: error: {problem}", file=sys.stderr)
        return 2
    if args.no_score:
        made = sum(entry.status == "pending" for entry in entries)
        print(f"memflow eval: {made} of {len(entries)} video(s) ready under {args.output_dir}")
        return 0 if made else 1
    scorer = VideoScorer(
        clip=scorer_model(args.clip_model, save_tiny_clip, args.output_dir, "clip"),
        dino=scorer_model(args.dino_model, save_tiny_dino, args.output_dir, "dino"),
        aesthetic=args.aesthetic_head,
        aesthetic_clip=args.aesthetic_clip_model,
        device=args.device,
        batch_size=args.batch_size,
    )
    from .report import summary_markdown

    result = evaluate(entries, scorer, protocol, args.output_dir, progress=progress)
    print(summary_markdown(result))
    for name, path in result.files.items():
        print(f"{name}: {path}")
    return 0 if len(result.failed) < len(result.video_rows) else 1


def _check_scorers(args: argparse.Namespace) -> str | None:
    """Whether the feature models can be had, checked before anything is generated (their
    configs only; the weights load when scoring starts)."""
    from transformers import AutoConfig

    models = [("--clip-model", args.clip_model), ("--dino-model", args.dino_model)]
    if args.aesthetic_head:
        if not Path(args.aesthetic_head).is_file():
            return f"--aesthetic-head: no such file {args.aesthetic_head!r}"
        models.append(("--aesthetic-clip-model", args.aesthetic_clip_model))
    for option, name in models:
        if name == TINY_RANDOM or Path(name).is_dir():
            continue
        try:
            AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as problem:
            reason = str(problem).strip().splitlines()[0]
            return (
                f"{option} {name!r} cannot be loaded ({reason}); offline, give a local folder, "
                f"'{TINY_RANDOM}' for a smoke run, or --no-score to generate only"
            )
    return None


def scorer_model(
    name: str, save_tiny: Callable[[Path], Path], output_dir: str, kind: str
) -> str:
    """``name``, or for ``tiny-random`` the folder the tiny model is saved into."""
    if name != TINY_RANDOM:
        return name
    return str(save_tiny(Path(output_dir) / "tiny-scorers" / kind))


def _check_arguments(args: argparse.Namespace) -> str | None:
    if args.videos is not None and (args.model is not None or args.config):
        return "--videos scores existing videos; --model and --config are for generation"
    if args.videos is not None and args.no_score:
        return "--no-score generates only; it cannot be used with --videos"
    for name in ("limit", "latent_frames", "height", "width", "max_sequence_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {value}"
    for name in ("frames_per_prompt", "fps", "boundary_frames", "frames_per_chunk", "batch_size"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    return None


def pipe_factory(model: str | None, device: str | None, dtype_name: str) -> Any:
    """A zero-argument builder of the diffusers pipeline (called only if something is to be
    generated)."""
    import torch

    if model in (None, TINY_RANDOM):
        from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

        return lambda: build_tiny_wan_pipeline(seed=0)

    def load() -> Any:
        from diffusers import DiffusionPipeline

        on_cuda = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype_name)
        if dtype is None:
            dtype = torch.bfloat16 if on_cuda.type == "cuda" else torch.float32
        return DiffusionPipeline.from_pretrained(model, dtype=dtype)

    return load


def main(argv: list[str] | None = None) -> int:
    """Run ``eval`` on its own (``python -m memflow_apps.eval.cli``)."""
    parser = argparse.ArgumentParser(prog="memflow")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
