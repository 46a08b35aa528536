"""Does a narrative-world model copy what its context shows? Teacher-forced probes at pure noise.

For each story, the clean latents of the script are committed chunk by chunk into a MemFlow
session (teacher forcing), and at four chunks (``memflow_apps.world.probes.PROBES``) the model
predicts the clean chunk from pure noise: the return's first chunk (the entity's look only in the
bank), its second (the entity in the window), the entrance's second with its prompt dropped (place
and entity in the window), and the walker's second, described by its prompt. Printed per probe:
how often the predicted frame's entity has the true look (colour, size, shape), and the mean
squared latent error inside the frame's centre (the entity) and outside it (the place).
Development stories only (seeds below the held-out ones).

    .venv/bin/python bench/world_copy_probe.py --model /tmp/export --first-seed 100 --stories 20
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import torch

from memflow_apps.world import load_world_pipeline
from memflow_apps.world.probes import PROBES, probe_story


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a world model folder (default: packaged)")
    parser.add_argument("--layout", default="reference")
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--stories", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_world_pipeline(args.model) if args.model else load_world_pipeline()
    seeds = range(args.first_seed, args.first_seed + args.stories)
    results = [result for seed in seeds for result in probe_story(pipe, args.layout, seed)]
    table = {}
    print(f"teacher-forced predictions at sigma 1, {args.layout}, stories {seeds.start}.."
          f"{seeds.stop - 1} (world {pipe.sampling.edition})")
    print(f"{'probe':<22}{'look right':>11}{'centre error':>14}{'place error':>13}")
    for probe in PROBES:
        rows = [result for result in results if result.probe == probe.name]
        table[probe.name] = {
            "look_right": sum(row.right for row in rows) / len(rows),
            "centre_error": statistics.mean(row.centre_error for row in rows),
            "place_error": statistics.mean(row.place_error for row in rows),
        }
        row = table[probe.name]
        print(f"{probe.name:<22}{row['look_right']:>11.0%}{row['centre_error']:>14.3f}"
              f"{row['place_error']:>13.4f}")
    return table


if __name__ == "__main__":
    main()
