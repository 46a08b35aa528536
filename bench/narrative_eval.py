"""Narrative-world quality benchmark: does memory keep a returning entity consistent?

For N held-out scripts (seeds 0 .. N-1; training used seeds >= 1000), a trained world model
generates each six-prompt story under four memory layouts, side by side in one run: MemFlow
(`reference`: sink + NAM bank + window), MemFlow with SMA, LongLive (sink + window) and the local
window alone. The exact detectors score prompt adherence, the consistency of the returning entity
and place with their first appearance, and the time per chunk (see memflow_adapter/world/
scoring.py).

    .venv/bin/python bench/narrative_eval.py --scripts 20          # the packaged model
    .venv/bin/python bench/narrative_eval.py --model outputs/world/model --scripts 50
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from memflow_adapter.world import load_world_pipeline, make_script
from memflow_adapter.world.pipeline import WORLD_MODEL_DIR
from memflow_adapter.world.scoring import (
    WORLD_LAYOUTS,
    generate_script,
    mean_scores,
    score_script,
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
    "seconds_per_chunk": "ms / chunk",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scripts", type=int, default=50, help="held-out scripts (seeds 0..N-1)")
    parser.add_argument("--model", type=Path, default=WORLD_MODEL_DIR,
                        help="a trained world transformer folder (memflow_adapter.world.export; "
                        "default: the packaged model)")
    parser.add_argument("--guidance-scale", type=float, default=1.0,
                        help="classifier-free guidance (above 1; negative: the empty prompt)")
    parser.add_argument("--layouts", nargs="+", choices=sorted(WORLD_LAYOUTS),
                        default=list(WORLD_LAYOUTS), help="the memory layouts to compare")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the table as JSON")
    args = parser.parse_args()
    if not 1 <= args.scripts <= 1000:
        parser.error(f"--scripts must be in 1..1000 (held-out seeds), got {args.scripts}")
    torch.set_num_threads(args.threads)
    pipe = load_world_pipeline(args.model)
    scripts = [make_script(seed) for seed in range(args.scripts)]
    table = {}
    for layout in args.layouts:
        streaming = streaming_world(pipe, layout)
        scores = []
        for seed, script in enumerate(scripts):
            generated = generate_script(streaming, script, seed, args.guidance_scale)
            scores.append(score_script(script, generated.video, generated.chunk_seconds))
        table[layout] = mean_scores(scores)
    print(f"{args.scripts} held-out scripts, 24 latent frames (12 chunks) each, guidance scale "
          f"{args.guidance_scale:g}, {args.threads} CPU threads; rates in %")
    print("| layout | " + " | ".join(COLUMNS.values()) + " |")
    print("| --- " * (len(COLUMNS) + 1) + "|")
    for layout, row in table.items():
        cells = [
            f"{1000 * row[key]:.1f}" if key == "seconds_per_chunk" else f"{100 * row[key]:.0f}"
            for key in COLUMNS
        ]
        print(f"| {layout} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
