"""Narrative-world quality benchmark: does memory keep a returning entity consistent?

For N held-out scripts (seeds 0 .. N-1; training used seeds >= 1000), a trained world model
generates each six-prompt story under four memory layouts, side by side in one run: MemFlow
(`reference`: sink + NAM bank + window), MemFlow with SMA, LongLive (sink + window) and the local
window alone. The exact detectors score prompt adherence, the consistency of the returning entity
and place with their first appearance, and the time per chunk (see memflow_apps/world/
scoring.py), then, story by story against the window alone, how often the returning entity
matches its first look (and its colour) only with memory or only without it, with an exact sign
test. The "first drawn as prompted" columns say how often the entity's first appearance looks as
its prompt describes it (whole look, then each attribute): what the model can draw at all,
without memory.

    .venv/bin/python bench/narrative_eval.py --scripts 20          # the packaged model
    .venv/bin/python bench/narrative_eval.py --models memflow_apps/world/model \\
        memflow_apps/world/student --scripts 50                   # many-step vs student
    .venv/bin/python bench/narrative_eval.py --rope-frames 10 --position-overflow clamp
    .venv/bin/python bench/narrative_eval.py --cache-dtype int8

``--rope-frames`` shortens the model's RoPE table so that the stories stream past it: the
returning entity's first appearance (frames 4..7) is then far beyond the table when it returns
(frames 20..23), and only the re-based memory positions (``--position-overflow``) can place it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from integrations.wan import shorten_rope_table
from memflow_adapter.frame_buffer import CACHE_DTYPES
from memflow_adapter.positions import POSITION_OVERFLOWS
from memflow_apps.world import load_world_pipeline, make_script
from memflow_apps.world.pipeline import WORLD_MODEL_DIR, WORLD_STUDENT_DIR
from memflow_apps.world.scoring import (
    WORLD_LAYOUTS,
    compare_paired,
    generate_script,
    mean_scores,
    score_script,
    script_schedule,
    streaming_world,
)

COLUMNS = {
    "adherence": "adherence",
    "return_looks": "return = first look",
    "return_colour": "colour",
    "return_size": "size",
    "return_shape": "shape",
    "return_truth": "return = script",
    "return_place": "place back",
    "first_looks": "first drawn as prompted: look",
    "first_colour": "colour",
    "first_size": "size",
    "first_shape": "shape",
    "seconds_per_chunk": "ms / chunk",
}
#: The memory-free layout every other one is compared with story by story.
BASELINE = "window_only"
#: The per-story checks compared: the returning entity as first seen, and its colour.
PAIRED_CHECKS = ("return_looks", "return_colour")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scripts", type=int, default=50, help="held-out scripts (seeds 0..N-1)")
    parser.add_argument("--models", type=Path, nargs="+", default=[WORLD_MODEL_DIR],
                        help="trained world transformer folders (memflow_apps.world.export), "
                        "each sampled as its sampling.json says, side by side (default: the "
                        "packaged many-step model; the packaged student is "
                        f"{WORLD_STUDENT_DIR})")
    parser.add_argument("--guidance-scale", type=float,
                        help="classifier-free guidance for every model (negative: the zero "
                        "embedding; default: each model's own; 1 disables it)")
    parser.add_argument("--layouts", nargs="+", choices=sorted(WORLD_LAYOUTS),
                        default=list(WORLD_LAYOUTS), help="the memory layouts to compare")
    parser.add_argument("--switch-offset", type=int, default=0,
                        help="move every prompt switch this many latent frames late (1: off the "
                        "2-frame chunk boundaries, applied and recached at the next one)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="score the held-out scripts of seeds first .. first + N - 1")
    parser.add_argument("--rope-frames", type=int,
                        help="shorten the model's RoPE table to this many latent frames, so that "
                        "the stories stream past it (re-based positions)")
    parser.add_argument("--position-overflow", choices=POSITION_OVERFLOWS,
                        help="where memory frames go past the RoPE table (default: the config's)")
    parser.add_argument("--cache-dtype", choices=sorted(CACHE_DTYPES),
                        help="a quantized KV cache (default: the model dtype)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path,
                        help="also write the tables and every story's scores as JSON")
    args = parser.parse_args()
    seeds = range(args.first_seed, args.first_seed + args.scripts)
    if args.scripts < 1 or seeds.start < 0 or seeds.stop > 1000:
        parser.error(f"--first-seed and --scripts must pick seeds in 0..999 (held out), got "
                     f"{seeds.start}..{seeds.stop - 1}")
    torch.set_num_threads(args.threads)
    pipes = {_model_name(folder, args.models): load_world_pipeline(folder)
             for folder in args.models}
    overrides = {name: getattr(args, name) for name in ("position_overflow", "cache_dtype")
                 if getattr(args, name)}
    per_story = {}
    for name, pipe in pipes.items():
        if args.rope_frames:
            shorten_rope_table(pipe.transformer, args.rope_frames)
        guidance = pipe.sampling.guidance_scale if args.guidance_scale is None else \
            args.guidance_scale
        print(f"{name}: {pipe.sampling.schedule.steps} ({pipe.sampling.describe()}), sampled "
              f"at guidance scale {guidance:g}, world edition {pipe.sampling.edition}")
        # each model is scored on the scripts of the world edition it was trained on
        scripts = {seed: make_script(seed, pipe.sampling.edition) for seed in seeds}
        for layout in args.layouts:
            streaming = streaming_world(pipe, layout, **overrides)
            row = f"{name}: {layout}" if len(pipes) > 1 else layout
            per_story[row] = []
            for seed, script in scripts.items():
                generated = generate_script(
                    streaming, script, seed, guidance, args.switch_offset
                )
                schedule = script_schedule(script, args.switch_offset)
                per_story[row].append(
                    score_script(script, generated.video, generated.chunk_seconds, schedule)
                )
    table = {layout: mean_scores(scores) for layout, scores in per_story.items()}
    table_frames = next(iter(pipes.values())).transformer.rope.max_seq_len
    print(f"{args.scripts} held-out scripts (seeds {seeds.start}..{seeds.stop - 1}), 24 latent "
          f"frames (12 chunks) each through a {table_frames}-frame RoPE table, switches "
          f"{args.switch_offset} frame(s) late, config overrides {overrides or 'none'}, "
          f"{args.threads} CPU threads; rates in %")
    print("| layout | " + " | ".join(COLUMNS.values()) + " |")
    print("| --- " * (len(COLUMNS) + 1) + "|")
    for layout, row in table.items():
        cells = [
            f"{1000 * row[key]:.1f}" if key == "seconds_per_chunk" else f"{100 * row[key]:.0f}"
            for key in COLUMNS
        ]
        print(f"| {layout} | " + " | ".join(cells) + " |")
    paired = _print_paired(per_story)
    if args.json:
        stories = {layout: [dataclasses.asdict(score) for score in scores]
                   for layout, scores in per_story.items()}
        sampling = {name: {"steps": list(pipe.sampling.schedule.steps),
                           "stochastic": pipe.sampling.schedule.stochastic,
                           "guidance_scale": pipe.sampling.guidance_scale
                           if args.guidance_scale is None else args.guidance_scale,
                           "edition": pipe.sampling.edition}
                    for name, pipe in pipes.items()}
        result = {"seeds": [seeds.start, seeds.stop - 1], "models": sampling,
                  "switch_offset": args.switch_offset, "rope_frames": table_frames,
                  "config_overrides": overrides,
                  "layouts": table, f"paired_against_{BASELINE}": paired, "stories": stories}
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def _model_name(folder: Path, folders: list[Path]) -> str:
    """A model's name in the tables: its folder's name (the whole path if two share one)."""
    names = [other.name for other in folders]
    return folder.name if names.count(folder.name) == 1 else str(folder)


def _print_paired(per_story: dict) -> dict:
    """Print (and return) each layout's story-by-story comparison with the same model's
    ``BASELINE``."""
    baselines = {row.removesuffix(BASELINE): row for row in per_story if row.endswith(BASELINE)}
    if not baselines or len(per_story) == len(baselines):
        return {}
    print(f"\nStory by story against {BASELINE}: stories where the check holds only with the "
          f"layout / only with {BASELINE}, and the exact two-sided sign test's p")
    print("| layout | " + " | ".join(COLUMNS[check] for check in PAIRED_CHECKS) + " |")
    print("| --- " * (len(PAIRED_CHECKS) + 1) + "|")
    paired = {}
    for layout, scores in per_story.items():
        model = layout.split(": ")[0] + ": " if ": " in layout else ""
        baseline = baselines.get(model)
        if baseline is None or layout == baseline:
            continue
        comparisons = {
            check: compare_paired(scores, per_story[baseline], check) for check in PAIRED_CHECKS
        }
        cells = [f"{c.only_layout} / {c.only_baseline}, p = {c.p_value:.2g}"
                 for c in comparisons.values()]
        print(f"| {layout} | " + " | ".join(cells) + " |")
        paired[layout] = {
            check: {**dataclasses.asdict(c), "p_value": c.p_value}
            for check, c in comparisons.items()
        }
    return paired


if __name__ == "__main__":
    main()
