"""Does a quantized KV cache keep the narrative world's memory? fp8 / int8 against the model
dtype on held-out stories, side by side in one run.

For each held-out script (seeds ``--first-seed ..``), the trained world model streams the story
with each cache dtype under the MemFlow layouts (``reference`` and ``reference_sma``). Against the
unquantized run of the same story and layout it reports:

* the streamed latents' max and RMS difference (and the RMS relative to the latents' RMS);
* NAM's picks: the share of (chunk, layer) banks holding exactly the same frames, and the share
  of stories in which every bank of every chunk and layer is the same;
* the scores of bench/narrative_eval.py (prompt adherence, returning entity's look and colour),
  so that a change of picks shows up as what it costs, if anything.

    .venv/bin/python bench/quantized_world.py --scripts 50
"""

from __future__ import annotations

import argparse
import statistics

import torch

from memflow_apps.world import load_world_pipeline, make_script
from memflow_apps.world.pipeline import WORLD_GUIDANCE_SCALE, WORLD_MODEL_DIR
from memflow_apps.world.scoring import (
    generate_script,
    mean_scores,
    score_script,
    streaming_world,
)

CACHE_DTYPES = (None, "float8_e4m3fn", "int8")
LAYOUTS = ("reference", "reference_sma")
SCORES = {"adherence": "adherence", "return_looks": "return = first look",
          "return_colour": "colour"}


def bank_agreement(trace, exact_trace) -> tuple[int, int]:
    """``(same, total)`` (chunk, layer) banks of two memory traces of one story."""
    pairs = [
        (chunk.bank[layer], exact.bank[layer])
        for chunk, exact in zip(trace, exact_trace, strict=True)
        for layer in exact.bank
    ]
    return sum(a == b for a, b in pairs), len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scripts", type=int, default=50)
    parser.add_argument("--first-seed", type=int, default=0, help="held-out seeds (< 1000)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    seeds = range(args.first_seed, args.first_seed + args.scripts)
    if args.scripts < 1 or seeds.start < 0 or seeds.stop > 1000:
        parser.error(f"seeds must be in 0..999 (held out), got {seeds.start}..{seeds.stop - 1}")
    torch.set_num_threads(args.threads)
    pipe = load_world_pipeline(WORLD_MODEL_DIR)
    print(f"{args.scripts} held-out scripts (seeds {seeds.start}..{seeds.stop - 1}), world model, "
          f"guidance {WORLD_GUIDANCE_SCALE:g}, {args.threads} threads; rates in %")
    print("| layout | cache | latents max diff | RMS diff (relative) | banks same | stories all "
          "same | " + " | ".join(SCORES.values()) + " |")
    print("| --- " * (6 + len(SCORES)) + "|")
    for layout in LAYOUTS:
        runs = {}
        for cache_dtype in CACHE_DTYPES:
            overrides = {"cache_dtype": cache_dtype} if cache_dtype else {}
            streaming = streaming_world(pipe, layout, **overrides)
            runs[cache_dtype] = {}
            for seed in seeds:
                script = make_script(seed, pipe.sampling.edition)
                generated = generate_script(streaming, script, seed)
                score = score_script(script, generated.video, generated.chunk_seconds)
                runs[cache_dtype][seed] = (generated.output, score)
        for cache_dtype, run in runs.items():
            max_diff, rms, relative, same, total, all_same = [], [], [], 0, 0, 0
            for seed, (output, _) in run.items():
                exact = runs[None][seed][0]
                difference = output.latents - exact.latents
                max_diff.append(difference.abs().max().item())
                rms.append(difference.pow(2).mean().sqrt().item())
                relative.append(rms[-1] / exact.latents.pow(2).mean().sqrt().item())
                story_same, story_total = bank_agreement(output.trace, exact.trace)
                same, total, all_same = same + story_same, total + story_total, (
                    all_same + (story_same == story_total))
            scores = mean_scores([score for _, score in run.values()])
            cells = [
                f"{max(max_diff):.4f}",
                f"{statistics.mean(rms):.5f} ({100 * statistics.mean(relative):.2f}%)",
                f"{100 * same / total:.1f}",
                f"{100 * all_same / len(run):.0f}",
                *(f"{100 * scores[key]:.0f}" for key in SCORES),
            ]
            print(f"| {layout} | {cache_dtype or 'model dtype'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
